"""Submit keys: a retried SUBMIT inserts nothing twice, through the broker's group commit, on real
PostgreSQL; and an older schema migrates to the one a fresh `db init` makes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from conftest import Database, old_schema
from psycopg import sql

from conduit.broker.writes import SubmitOp, WriteBatch, execute
from conduit.store import Store, init_schema
from conduit.task import Submitted, TaskSpec


def op(key: str | None, n: int, *, worker: str | None = None, rid: int = 1) -> SubmitOp:
    waiter = None if worker is None else 7
    return SubmitOp(
        b"peer",
        rid,
        [TaskSpec("q", b"%d" % i) for i in range(n)],
        [waiter] * n,
        [worker is not None] * n,
        key,
    )


def run(store: Store, *ops: SubmitOp) -> list[list[Submitted] | None]:
    owner = store.acquire_broker("b1", "tcp://x", 30)
    return execute(store, WriteBatch(submits=list(ops)), owner).submitted


def test_a_retried_submit_gets_the_first_ids_and_inserts_nothing(store: Store, db) -> None:
    (first,) = run(store, op("k1", 3))
    assert first is not None and [s.created for s in first] == [True] * 3
    (again,) = run(store, op("k1", 3))
    assert again == [Submitted(s.id, False) for s in first]
    assert db.query("SELECT count(*) FROM tasks") == [(3,)]
    assert db.query("SELECT ids FROM submit_keys WHERE key = 'k1'") == [([s.id for s in first],)]


def test_the_same_key_twice_in_one_group_commit_inserts_once(store: Store, db) -> None:
    """A retry that reaches the same broker while the original waits for the same commit."""
    first, again, other = run(store, op("k", 2), op("k", 2, rid=2), op(None, 1, rid=3))
    assert first is not None and again == [Submitted(s.id, False) for s in first]
    assert other is not None and other[0].created
    assert db.query("SELECT count(*) FROM tasks") == [(3,)]


def test_sync_matched_and_plain_tasks_of_one_keyed_submit_are_recorded_together(store: Store, db) -> None:
    mixed = SubmitOp(b"p", 1, [TaskSpec("q", b"a"), TaskSpec("q", b"b")], [None, 7], [False, True], "k")
    (first,) = run(store, mixed)
    (again,) = run(store, mixed)
    assert first is not None and again == [Submitted(s.id, False) for s in first]
    assert [s.owned for s in first] == [False, True]
    assert sorted(db.query("SELECT state, attempt FROM live_tasks")) == [("buffered", 1), ("pending", 0)]


def test_a_key_reused_for_another_number_of_tasks_is_refused(store: Store, db) -> None:
    run(store, op("k", 2))
    assert run(store, op("k", 3), op(None, 1, rid=2))[0] is None  # the others still go in
    assert db.query("SELECT count(*) FROM tasks") == [(3,)]


def test_racing_retries_on_two_brokers_insert_once(db) -> None:
    """The retry's claim waits for the original's transaction; committed, it replays its ids."""
    with db.store() as a, db.store() as b:
        owner_a = a.acquire_broker("a", "tcp://a", 30)
        owner_b = b.acquire_broker("b", "tcp://b", 30)
        got: list[list[Submitted] | None] = []
        with a.transaction():
            (first,) = execute(a, WriteBatch(submits=[op("k", 4)]), owner_a).submitted
            racer = threading.Thread(
                target=lambda: got.extend(execute(b, WriteBatch(submits=[op("k", 4)]), owner_b).submitted)
            )
            racer.start()
            time.sleep(0.3)
            assert racer.is_alive()  # blocked on the uncommitted key
        racer.join(10)
        assert first is not None and got == [[Submitted(s.id, False) for s in first]]
    assert db.query("SELECT count(*) FROM tasks") == [(4,)]


def test_a_rolled_back_submit_leaves_its_key_free(db) -> None:
    with db.store() as store:
        owner = store.acquire_broker("b1", "tcp://x", 30)
        try:
            with store.transaction():
                execute(store, WriteBatch(submits=[op("k", 2)]), owner)
                raise RuntimeError("the commit never happens")
        except RuntimeError:
            pass
        (again,) = execute(store, WriteBatch(submits=[op("k", 2)]), owner).submitted
    assert again is not None and all(s.created for s in again)
    assert db.query("SELECT count(*) FROM tasks") == [(2,)]


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_schema_with_tasks_migrates_to_what_init_creates(server_dsn: str, version: int) -> None:
    """Version 1 is version 2 without submit keys. Live tasks keep their ids, payloads and attempts
    (a buffered one goes back to pending, a running one keeps its lease); finished ones their results."""
    old, new = (f"t_{uuid.uuid4().hex[:12]}" for _ in range(2))
    try:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(old)))
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(old)))
            conn.execute(old_schema(version).encode())
            conn.execute(
                "INSERT INTO tasks (id, queue, payload, state, attempt, broker, broker_epoch,"
                " lease_expires_at, max_attempts) VALUES (1, 'q', 'a', 'pending', 0, NULL, NULL, NULL, 3),"
                " (2, 'q', 'b', 'buffered', 1, 'b1', 1, NULL, 5),"
                " (3, 'q', 'c', 'running', 2, 'b1', 1, now() + interval '1 minute', 5)"
            )
            conn.execute(
                "INSERT INTO results (id, queue, state, priority, attempt, failures, max_attempts,"
                " lease_timeout, backoff_base, backoff_max, result, created_at)"
                " VALUES (4, 'q', 'completed', 0, 1, 0, 5, 30, 1, 300, 'r', now())"
            )
            conn.execute("SELECT setval('task_ids', 4)")
        assert init_schema(server_dsn, old) == "migrated"
        assert init_schema(server_dsn, new) == "created"
        assert _shape(server_dsn, old) == _shape(server_dsn, new)
        with Store.open(server_dsn, schema=old) as store:  # the version check passes
            infos = store.lookup([1, 2, 3, 4, 5])
            assert [(i.state, i.attempt) for i in infos] == [
                ("pending", 0),
                ("pending", 1),
                ("running", 2),
                ("completed", 1),
                (None, None),
            ]
            assert infos[3].result == b"r"
            assert store.queue_stats() == {"q": {"pending": 2, "running": 1, "completed": 1}}
            owner = store.acquire_broker("b2", "tcp://x", 30)
            leased = store.lease(owner, "q", 10)
            assert [(t.id, t.attempt, t.max_attempts, t.payload) for t in leased] == [
                (1, 1, 3, b"a"),
                (2, 2, 5, b"b"),
            ]
            (fresh,) = store.enqueue([TaskSpec("q", b"d")])
            assert fresh.id > 4
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            for schema in (old, new):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_a_version_3_schema_with_tasks_migrates_to_what_init_creates(server_dsn: str) -> None:
    """Version 3's unpartitioned tasks move into the buckets with every column; held and running
    tasks stay their owners', finished ones stay where they were."""
    old, new = (f"t_{uuid.uuid4().hex[:12]}" for _ in range(2))
    try:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(old)))
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(old)))
            conn.execute(old_schema(3).encode())
            conn.execute(
                "INSERT INTO policies (max_attempts, lease_timeout, backoff_base, backoff_max)"
                " VALUES (3, 30, 1, 300)"
            )
            conn.execute("INSERT INTO brokers VALUES (7, 'b1', 'tcp://x', now() + interval '1 minute')")
            conn.execute(
                "INSERT INTO tasks (id, queue, payload, policy, attempt, owner, lease_expires_at, last_error)"
                " VALUES (1, 'q', 'a', 1, 0, NULL, NULL, NULL), (200000, 'q', 'b', 1, 1, 7, NULL, NULL),"
                " (300000, 'q', 'c', 1, 2, 7, now() + interval '1 minute', 'boom')"
            )
            conn.execute(
                "INSERT INTO completions (queue, lo, hi, ids, attempts) VALUES ('q', 4, 4, '{4}', '{1}')"
            )
            conn.execute(
                "INSERT INTO queue_counts VALUES ('q', 'pending', 1), ('q', 'buffered', 1),"
                " ('q', 'running', 1), ('q', 'completed', 1)"
            )
            conn.execute("SELECT setval('task_ids', 300000)")
        assert init_schema(server_dsn, old) == "migrated"
        assert init_schema(server_dsn, new) == "created"
        assert _shape(server_dsn, old) == _shape(server_dsn, new)
        db = Database(server_dsn, old)
        assert db.query(
            "SELECT t.tableoid::regclass::text, t.id, l.state, t.attempt, t.last_error"
            " FROM tasks t JOIN live_tasks l USING (id) ORDER BY id"
        ) == [
            ("tasks_0", 1, "pending", 0, None),
            ("tasks_1", 200000, "buffered", 1, None),
            ("tasks_2", 300000, "running", 2, "boom"),
        ]
        with Store.open(server_dsn, schema=old) as store:
            infos = store.lookup([1, 200000, 300000, 4, 5])
            assert [(i.state, i.attempt) for i in infos] == [
                ("pending", 0),
                ("buffered", 1),
                ("running", 2),
                ("completed", 1),
                (None, None),
            ]
            assert store.queue_stats() == {"q": {"pending": 1, "buffered": 1, "running": 1, "completed": 1}}
            (fresh,) = store.enqueue([TaskSpec("q", b"d")])
            assert fresh.id > 300000
            assert [r.id for r in store.list_tasks(state="completed").rows] == [4]  # version 4's indexes
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            for schema in (old, new):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_a_version_4_schema_migrates_to_what_init_creates_and_keeps_its_tasks(server_dsn: str) -> None:
    """Version 5 only adds paused queues: a version 4 schema keeps every row and can pause."""
    with (
        _migrated(server_dsn, 4, "SELECT enqueue('q', 'a')") as old,
        Store.open(server_dsn, schema=old) as store,
    ):
        assert [(i.state, i.attempt) for i in store.lookup([1])] == [("pending", 0)]
        assert store.pause("q") and list(store.paused()) == ["q"]


def test_a_version_5_schema_migrates_to_what_init_creates_and_keeps_its_brokers(server_dsn: str) -> None:
    """Version 6 adds each broker's gossip endpoint: a version 5 broker row stays, with none."""
    row = "INSERT INTO brokers VALUES (nextval('broker_epochs'), 'old', 'tcp://o:1', now() + '1h')"
    with _migrated(server_dsn, 5, row) as old, Store.open(server_dsn, schema=old) as store:
        store.acquire_broker("new", "tcp://n:1", 30, pub="tcp://n:2")
        peers = store.broker_peers("new")
        assert [(p.broker, p.endpoint, p.pub) for p in peers] == [("old", "tcp://o:1", None)]
        assert [(p.broker, p.pub) for p in store.broker_peers("old")] == [("new", "tcp://n:2")]


@contextmanager
def _migrated(server_dsn: str, version: int, *statements: str) -> Iterator[str]:
    """A schema made as `version` shipped, with `statements` run in it, migrated and checked to
    be what a fresh init makes; its name, until it is dropped."""
    old, new = (f"t_{uuid.uuid4().hex[:12]}" for _ in range(2))
    try:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(old)))
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(old)))
            conn.execute(old_schema(version).encode())
            for statement in statements:
                conn.execute(statement.encode())
        assert init_schema(server_dsn, old) == "migrated"
        assert init_schema(server_dsn, new) == "created"
        assert _shape(server_dsn, old) == _shape(server_dsn, new)
        yield old
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            for schema in (old, new):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _shape(dsn: str, schema: str) -> list[tuple[object, ...]]:
    """Columns, indexes and the version of a schema, to compare two of them."""
    with psycopg.connect(dsn) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, replace(column_default, %s, ''), is_nullable"
            " FROM information_schema.columns WHERE table_schema = %s ORDER BY 1, 2",
            (schema, schema),
        ).fetchall()
        indexes = conn.execute(
            "SELECT tablename, indexname, replace(indexdef, %s, '') FROM pg_indexes"
            " WHERE schemaname = %s ORDER BY 1, 2",
            (schema, schema),
        ).fetchall()
        (version,) = conn.execute(
            sql.SQL("SELECT value FROM {}.meta WHERE key = 'schema_version'").format(sql.Identifier(schema))
        ).fetchone()
    return [*columns, *indexes, ("version", version)]


def test_a_stalled_broker_holding_a_submit_key_holds_a_retry_elsewhere_about_two_seconds(db) -> None:
    """A broker paused inside its group commit leaves the transaction open; the server ends it
    (idle_in_transaction_session_timeout), so the retry through another broker goes on."""
    with Store.open(db.dsn, schema=db.schema) as stalled, Store.open(db.dsn, schema=db.schema) as other:
        tx = stalled.conn.transaction()
        tx.__enter__()
        assert stalled.claim_submits(["k"]) == {"k": None}  # claimed, then the process "stops"
        began = time.monotonic()
        assert other.claim_submits(["k"]) == {"k": None}  # waited for the stalled one, then claimed
        waited = time.monotonic() - began
        assert 1.0 < waited < 4.0, waited
        assert stalled.conn.broken or stalled.conn.closed or _dead(stalled)


def _dead(store: Store) -> bool:
    try:
        store.conn.execute("SELECT 1")
    except psycopg.Error:
        return True
    return False


def test_version_6_migrates_to_a_prune_that_reads_dates_only_from_partition_names(server_dsn: str) -> None:
    """Version 6's prune() could call to_date on a task bucket's name (tasks_0: "invalid value
    'task' for YYYY"), as the plan chose; version 7's tests the name first."""
    with _migrated(server_dsn, 6) as old, psycopg.connect(server_dsn) as conn:
        migrated = conn.execute(
            "SELECT pg_get_functiondef(p.oid) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE p.proname = 'prune' AND n.nspname = %s",
            (old,),
        ).fetchone()
        assert migrated is not None
        assert "CASE WHEN right" in migrated[0]
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(old)))
        assert conn.execute("SELECT prune(interval '30 days')").fetchone() == (0,)
