"""`conduit db init` as users run it: several at once on a fresh schema, and on a schema at another
version, where it migrates an older one in place and refuses a newer one with a one-line error
(as does the broker, which never runs on a schema it does not know)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from conftest import BrokerProcess, Database, free_port, old_schema
from psycopg import sql

from conduit.client import Client
from conduit.store import init_schema
from conduit.store.queries import SCHEMA_VERSION
from conduit.task import TaskSpec

# Imports the CLI, says so, then waits for a line on stdin: released together, the processes run
# `db init` within moments of each other rather than a Python start-up apart.
AT_THE_LINE = (
    "import sys; from conduit.cli import main; print('ready', flush=True); sys.stdin.readline(); main()"
)


@pytest.fixture
def schema(server_dsn: str) -> Iterator[str]:
    """A schema name nobody has used; dropped afterwards, whatever the test made of it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def conduit(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "conduit", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def execute(dsn: str, schema: str, statement: str, params: tuple[object, ...] = ()) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(statement.encode(), params)


def tables(dsn: str, schema: str) -> list[tuple[object, ...]]:
    return Database(dsn, schema).query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1", (schema,)
    )


def version(dsn: str, schema: str) -> list[tuple[object, ...]]:
    return Database(dsn, schema).query("SELECT value FROM meta WHERE key = 'schema_version'")


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI's error contract: non-zero exit, one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_db_init_run_concurrently_on_a_fresh_schema_makes_one(server_dsn: str, schema: str, db) -> None:
    args = ["db", "init", "--dsn", server_dsn, "--schema", schema]
    with contextlib.ExitStack() as stack:
        procs = []
        for _ in range(6):
            proc = subprocess.Popen(
                [sys.executable, "-c", AT_THE_LINE, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            stack.enter_context(proc)
            stack.callback(proc.kill)  # before its exit waits: nothing outlives the test
            procs.append(proc)
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = [(proc.wait(60), *proc.communicate()) for proc in procs]
    assert [rc for rc, _, _ in outcomes] == [0] * 6, [err for _, _, err in outcomes]
    assert sum("created" in out for _, out, _ in outcomes) == 1, [out for _, out, _ in outcomes]
    assert version(server_dsn, schema) == [(str(SCHEMA_VERSION),)]
    assert tables(server_dsn, schema) == tables(db.dsn, db.schema)  # whole, like any fresh one


def make_version_1(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(old_schema(1).encode())


def test_an_older_schema_is_refused_by_the_broker_and_migrated_in_place_by_db_init(
    server_dsn: str, schema: str, processes
) -> None:
    make_version_1(server_dsn, schema)
    bind = f"tcp://127.0.0.1:{free_port()}"
    refused = conduit("broker", "--dsn", server_dsn, "--schema", schema, "--bind", bind)
    assert "version 1" in one_line_error(refused) and "conduit db init" in refused.stderr
    migrated = conduit("db", "init", "--dsn", server_dsn, "--schema", schema)
    assert migrated.returncode == 0, migrated.stderr
    assert version(server_dsn, schema) == [(str(SCHEMA_VERSION),)]
    broker = BrokerProcess(Database(server_dsn, schema), free_port(), "b1")
    processes.append(broker)
    with Client(broker.endpoint) as client:  # a batch carries a submit key: version 2's table
        ids = client.submit_many([TaskSpec("migrated", b"x") for _ in range(3)])
    assert Database(server_dsn, schema).query("SELECT ids FROM submit_keys") == [(ids,)]


def test_db_init_says_it_migrated_an_older_schema(server_dsn: str, schema: str) -> None:
    make_version_1(server_dsn, schema)
    migrated = conduit("db", "init", "--dsn", server_dsn, "--schema", schema)
    assert migrated.returncode == 0 and "migrated" in migrated.stdout, migrated.stdout


def test_a_newer_schema_is_refused_by_db_init_and_the_broker_and_left_alone(
    server_dsn: str, schema: str
) -> None:
    init_schema(server_dsn, schema)
    newer = str(SCHEMA_VERSION + 1)
    execute(server_dsn, schema, "UPDATE meta SET value = %s", (newer,))
    for args in (["db", "init"], ["broker", "--bind", f"tcp://127.0.0.1:{free_port()}"]):
        proc = conduit(*args, "--dsn", server_dsn, "--schema", schema)
        assert f"version {newer}" in one_line_error(proc) and "upgrade Conduit" in proc.stderr
        assert proc.stdout == ""  # a broker prints its endpoint once it serves: it never did
    assert version(server_dsn, schema) == [(newer,)]
