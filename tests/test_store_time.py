"""Time and order: run_at, retry backoff, priority, dead-lettering and redrive."""

from __future__ import annotations

import time

from conduit.store import Store
from conduit.task import Ack, Completion, Failure, TaskSpec


def _lease_when_due(store: Store, owner, queue: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leased = store.lease(owner, queue, 1)
        if leased:
            return leased[0]
        time.sleep(0.02)
    raise AssertionError("task never became due")


def test_delayed_task_is_not_leased_before_run_at(store: Store) -> None:
    owner = store.acquire_broker("a", "tcp://a", 30)
    before = time.time()
    (sub,) = store.enqueue([TaskSpec("q", b"later", delay=1.0)])
    assert store.lease(owner, "q", 10) == []
    task = _lease_when_due(store, owner, "q")
    assert task.id == sub.id
    assert time.time() - before >= 1.0
    assert task.run_at.timestamp() >= before + 1.0


def test_retry_waits_out_its_backoff(store: Store, db) -> None:
    owner = store.acquire_broker("a", "tcp://a", 30)
    store.enqueue([TaskSpec("slow", b"x", backoff_base=60), TaskSpec("fast", b"y", backoff_base=0.5)])
    (slow,) = store.lease(owner, "slow", 1)
    (fast,) = store.lease(owner, "fast", 1)
    failed_at = time.time()
    assert store.fail([Failure(slow.id, slow.attempt, "e1"), Failure(fast.id, fast.attempt, "e2")]) == [
        "ok",
        "ok",
    ]
    (delay,) = db.query("SELECT extract(epoch FROM run_at - now()) FROM tasks WHERE id = %s", (slow.id,))[0]
    assert 29 <= delay <= 60  # base 60 s with equal jitter: between half and all of it
    assert store.lease(owner, "slow", 1) == []
    again = _lease_when_due(store, owner, "fast")
    assert again.id == fast.id and again.failures == 1 and again.attempt == 2
    assert time.time() - failed_at >= 0.25
    assert store.lookup([fast.id])[0].error == "e2"


def test_backoff_grows_exponentially_up_to_its_cap(store: Store, db) -> None:
    owner = store.acquire_broker("a", "tcp://a", 30)
    (sub,) = store.enqueue([TaskSpec("q", b"x", max_attempts=10, backoff_base=10, backoff_max=35)])
    delays = []
    for failures in range(3):
        db.query("UPDATE tasks SET run_at = now() - interval '1 s' WHERE id = %s RETURNING id", (sub.id,))
        (task,) = store.lease(owner, "q", 1)
        assert task.failures == failures
        store.fail([Failure(task.id, task.attempt, "again")])
        delays.append(
            db.query("SELECT extract(epoch FROM run_at - now()) FROM tasks WHERE id = %s", (sub.id,))[0][0]
        )
    assert 4.9 <= delays[0] <= 10 and 9.9 <= delays[1] <= 20 and 17.4 <= delays[2] <= 35


def test_priority_then_run_at_then_id(store: Store) -> None:
    owner = store.acquire_broker("a", "tcp://a", 30)
    subs = store.enqueue([TaskSpec("q", bytes([p + 10]), priority=p) for p in (5, 0, 3, 0, -1)])
    order = [store.lease(owner, "q", 1)[0].id for _ in subs]
    expected = [subs[4].id, subs[1].id, subs[3].id, subs[2].id, subs[0].id]
    assert order == expected
    assert store.lease(owner, "q", 1) == []


def test_batch_lease_is_ordered(store: Store) -> None:
    owner = store.acquire_broker("a", "tcp://a", 30)
    store.enqueue([TaskSpec("q", b"x", priority=p) for p in (3, 1, 2, 1, 0)])
    assert [t.priority for t in store.lease(owner, "q", 10)] == [0, 1, 1, 2, 3]


def test_dead_after_max_attempts_then_redrive(store: Store, db) -> None:
    owner = store.acquire_broker("a", "tcp://a", 30)
    (sub,) = store.enqueue([TaskSpec("q", b"poison", max_attempts=2, backoff_base=0)])
    for n in range(2):
        task = _lease_when_due(store, owner, "q")
        assert store.fail([Failure(task.id, task.attempt, f"boom {n}")]) == ["ok"]
    info = store.lookup([sub.id])[0]
    assert (info.state, info.error, info.attempt) == ("dead", "boom 1", 2)
    assert store.lease(owner, "q", 1) == []
    assert store.queue_stats()["q"] == {"dead": 1}
    assert store.redrive("q") == [sub.id]
    task = _lease_when_due(store, owner, "q")
    assert (task.payload, task.failures, task.attempt) == (b"poison", 0, 3)
    assert store.complete([Completion(task.id, task.attempt, b"ok")]) == ["ok"]
    assert store.redrive("q") == []


def test_fail_without_retry_is_dead_at_once(store: Store) -> None:
    owner = store.acquire_broker("a", "tcp://a", 30)
    (sub,) = store.enqueue([TaskSpec("q", b"x", max_attempts=5)])
    (task,) = store.lease(owner, "q", 1)
    assert store.fail([Failure(task.id, task.attempt, "bad input", retry=False)]) == ["ok"]
    assert store.lookup([sub.id])[0].state == "dead"


def test_expired_leases_count_toward_max_attempts(store: Store) -> None:
    """A task that kills every worker it runs on ends dead instead of looping forever."""
    owner = store.acquire_broker("a", "tcp://a", 30)
    (sub,) = store.enqueue([TaskSpec("q", b"x", max_attempts=2, lease_timeout=0.1, backoff_base=0)])
    for _ in range(2):
        task = _lease_when_due(store, owner, "q")
        store.start(owner, [Ack(task.id, task.attempt)])
        time.sleep(0.15)
        assert store.reap().running == 1
    info = store.lookup([sub.id])[0]
    assert info.state == "dead" and "lease expired" in (info.error or "")


def test_run_at_orders_within_a_priority_and_id_breaks_ties(store: Store, db) -> None:
    """(priority, run_at, id): of equal priority, the task due longest goes first whatever its id;
    priority still comes before run_at, and equal run_at goes by id. Leased two at a time, so the
    statement's own order picks each batch, and each batch comes back in that order."""
    owner = store.acquire_broker("a", "tcp://a", 30)
    priorities = (0, 0, 0, 1, 0, 0)
    ids = [s.id for s in store.enqueue([TaskSpec("q", b"x", priority=p) for p in priorities])]
    overdue = [20, 30, 10, 40, 5, 5]  # seconds; the last two are due at the same instant
    db.query(
        "UPDATE tasks t SET run_at = now() - v.s * interval '1 second'"
        " FROM unnest(%s::bigint[], %s::int[]) AS v(id, s) WHERE t.id = v.id RETURNING t.id",
        (ids, overdue),
    )
    batches = [[t.id for t in store.lease(owner, "q", 2)] for _ in range(3)]
    assert batches == [[ids[1], ids[0]], [ids[2], ids[4]], [ids[5], ids[3]]]
    assert store.lease(owner, "q", 2) == []
