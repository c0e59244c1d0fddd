"""Enqueue, idempotency keys, transactional enqueue, validation and counters, on real PostgreSQL."""

from __future__ import annotations

import threading

import psycopg
import pytest
from psycopg import sql

from conduit.errors import InvalidTask
from conduit.store import Store
from conduit.task import Completion, Submitted, TaskSpec


def test_enqueue_returns_ids_in_order(store: Store, db) -> None:
    submitted = store.enqueue([TaskSpec("q", bytes([i])) for i in range(10)])
    assert [s.created for s in submitted] == [True] * 10
    ids = [s.id for s in submitted]
    assert ids == sorted(ids) and len(set(ids)) == 10
    rows = db.query("SELECT id, payload FROM tasks ORDER BY id")
    assert [(i, bytes([n])) for n, i in enumerate(ids)] == [(r[0], bytes(r[1])) for r in rows]


def test_idempotency_key_returns_first_task_and_inserts_nothing(store: Store, db) -> None:
    first = store.enqueue([TaskSpec("q", b"a", idempotency_key="k1")])[0]
    again = store.enqueue([TaskSpec("q", b"b", idempotency_key="k1")])[0]
    assert again.id == first.id and first.created and not again.created
    assert [bytes(p) for (p,) in db.query("SELECT payload FROM tasks")] == [b"a"]


def test_idempotency_key_duplicates_within_one_batch(store: Store, db) -> None:
    out = store.enqueue(
        [
            TaskSpec("q", b"a", idempotency_key="k"),
            TaskSpec("q", b"b"),
            TaskSpec("q", b"c", idempotency_key="k"),
        ]
    )
    assert out[0].id == out[2].id and out[0].created and not out[2].created
    assert out[1].created and out[1].id != out[0].id
    assert db.query("SELECT count(*) FROM tasks") == [(2,)]


def test_idempotency_key_outlives_completion_and_is_per_queue(store: Store, db) -> None:
    first = store.enqueue([TaskSpec("q", b"a", idempotency_key="k")])[0]
    owner = store.acquire_broker("b1", "tcp://x", 30)
    (task,) = store.lease(owner, "q", 10)
    assert store.complete([Completion(task.id, task.attempt, b"done")]) == ["ok"]
    assert store.enqueue([TaskSpec("q", b"a", idempotency_key="k")]) == [Submitted(first.id, created=False)]
    other = store.enqueue([TaskSpec("other", b"a", idempotency_key="k")])[0]
    assert other.created and other.id != first.id
    assert db.query("SELECT count(*) FROM tasks") == [(1,)]


def test_idempotency_key_racing_transactions_get_one_task(db) -> None:
    """A submit whose key another transaction holds waits for it and reports that task."""
    with db.store() as a, db.store() as b:
        results: list[int] = []
        with a.transaction():
            first = a.enqueue([TaskSpec("q", b"a", idempotency_key="race")])[0]
            racer = threading.Thread(
                target=lambda: results.append(b.enqueue([TaskSpec("q", b"b", idempotency_key="race")])[0].id)
            )
            racer.start()
            racer.join(0.3)
            assert racer.is_alive()  # blocked on the uncommitted key
        racer.join(10)
    assert results == [first.id]
    assert db.query("SELECT count(*) FROM tasks") == [(1,)]


def test_transactional_enqueue_rolls_back_with_the_callers_transaction(db) -> None:
    with psycopg.connect(db.dsn) as app:
        app.execute("CREATE TEMP TABLE orders (id int)")
        enqueue = sql.SQL("SELECT {}.enqueue('emails', %s, idempotency_key => 'order-1')").format(
            sql.Identifier(db.schema)
        )
        app.execute("INSERT INTO orders VALUES (1)")
        app.execute(enqueue, (b"mail",))
        app.rollback()
        assert db.query("SELECT count(*) FROM tasks") == [(0,)]
        assert db.query("SELECT count(*) FROM idempotency_keys") == [(0,)]
        (task_id,) = app.execute(enqueue, (b"mail",)).fetchone()
        (again,) = app.execute(enqueue, (b"other",)).fetchone()
        app.commit()
    assert again == task_id
    with db.store() as store:
        owner = store.acquire_broker("b1", "tcp://x", 30)
        leased = store.lease(owner, "emails", 10)
    assert [(t.id, t.payload) for t in leased] == [(task_id, b"mail")]


@pytest.mark.parametrize(
    "spec, message",
    [
        (TaskSpec("bad queue!", b"x"), "queue name"),
        (TaskSpec("q" * 65, b"x"), "queue name"),
        (TaskSpec("", b"x"), "queue name"),
        (TaskSpec("q", b"x" * 101), "pass a reference"),
        (TaskSpec("q", b"x", max_attempts=0), "max_attempts"),
        (TaskSpec("q", b"x", priority=40000), "priority"),
        (TaskSpec("q", b"x", idempotency_key=""), "idempotency key"),
    ],
)
def test_bad_tasks_are_refused_and_change_nothing(db, spec: TaskSpec, message: str) -> None:
    with db.store(max_payload_bytes=100) as store:
        with pytest.raises(InvalidTask, match=message):
            store.enqueue([TaskSpec("q", b"good"), spec])
        assert store.enqueue([TaskSpec("q", b"x" * 100)])[0].created  # the limit itself is allowed
    assert db.query("SELECT count(*) FROM tasks") == [(1,)]


def test_counters_match_the_tables(store: Store, db) -> None:
    store.enqueue([TaskSpec("a", b"x") for _ in range(30)] + [TaskSpec("b", b"y") for _ in range(5)])
    owner = store.acquire_broker("b1", "tcp://x", 30)
    leased = store.lease(owner, "a", 20)
    store.complete([Completion(t.id, t.attempt) for t in leased[:10]])
    store.cancel([leased[10].id])
    store.compact_counts()
    store.enqueue([TaskSpec("b", b"z")])
    truth: dict[str, dict[str, int]] = {}
    for table in ("live_tasks", "results"):
        for queue, state, n in db.query(f"SELECT queue, state, count(*) FROM {table} GROUP BY 1, 2"):
            truth.setdefault(queue, {})[state] = n
    assert store.queue_stats() == truth
    assert truth["a"] == {"pending": 10, "buffered": 9, "completed": 10, "cancelled": 1}


def test_transactional_enqueue_refuses_a_bad_queue_name(db) -> None:
    with psycopg.connect(db.dsn) as app:
        enqueue = sql.SQL("SELECT {}.enqueue('no spaces', %s)").format(sql.Identifier(db.schema))
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="queue name 'no spaces' is not valid"):
            app.execute(enqueue, (b"x",))
    assert db.query("SELECT count(*) FROM tasks") == [(0,)]
