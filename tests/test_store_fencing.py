"""Fencing: only the delivery that holds the current attempt may complete, fail or renew a task."""

from __future__ import annotations

import time

import pytest

from conduit.errors import BrokerLeaseLost
from conduit.store import Store
from conduit.store.store import Reaped
from conduit.task import Ack, Completion, Failure, TaskSpec


def _task_row(db, task_id: int) -> tuple[object, ...]:
    return db.query("SELECT state, attempt, failures, owner FROM live_tasks WHERE id = %s", (task_id,))[0]


def test_stale_attempts_are_refused_and_change_nothing(store: Store, db) -> None:
    (sub,) = store.enqueue([TaskSpec("q", b"x")])
    owner = store.acquire_broker("b1", "tcp://x", 30)
    (task,) = store.lease(owner, "q", 1)
    assert task.attempt == 1
    before = _task_row(db, sub.id)
    for attempt in (0, 2):
        assert store.complete([Completion(sub.id, attempt, b"r")]) == ["stale"]
        assert store.fail([Failure(sub.id, attempt, "boom")]) == ["stale"]
        assert store.renew(owner, [Ack(sub.id, attempt)]) == ["stale"]
        assert store.release([Ack(sub.id, attempt)]) == ["stale"]
    assert _task_row(db, sub.id) == before
    assert store.complete([Completion(999_999, 1)]) == ["unknown"]


def test_complete_once_then_finished(store: Store, db) -> None:
    (sub,) = store.enqueue([TaskSpec("q", b"x")])
    owner = store.acquire_broker("b1", "tcp://x", 30)
    (task,) = store.lease(owner, "q", 1)
    twice = [Completion(task.id, task.attempt, b"first"), Completion(task.id, task.attempt, b"second")]
    assert store.complete(twice) == ["ok", "finished"]
    assert store.complete([Completion(task.id, task.attempt, b"late")]) == ["finished"]
    assert store.fail([Failure(task.id, task.attempt, "late")]) == ["finished"]
    info = store.lookup([sub.id])[0]
    assert (info.state, info.result, info.attempt) == ("completed", b"first", 1)


def test_reaped_task_cannot_be_completed_by_its_old_holder(store: Store, db) -> None:
    (sub,) = store.enqueue([TaskSpec("q", b"x", lease_timeout=0.2, backoff_base=0)])
    a = store.acquire_broker("a", "tcp://a", 30)
    (task,) = store.lease(a, "q", 1)
    assert store.start(a, [Ack(task.id, task.attempt)]) == ["ok"]
    time.sleep(0.3)
    assert store.reap().running == 1
    assert _task_row(db, sub.id)[:3] == ("pending", 1, 1)  # attempt kept, one failure counted
    assert store.complete([Completion(sub.id, 1, b"zombie")]) == ["stale"]
    b = store.acquire_broker("b", "tcp://b", 30)
    (again,) = store.lease(b, "q", 1)
    assert again.attempt == 2
    assert store.renew(a, [Ack(sub.id, 1)]) == ["stale"]
    assert store.complete([Completion(sub.id, 1, b"zombie")]) == ["stale"]
    assert store.complete([Completion(sub.id, 2, b"current")]) == ["ok"]
    assert store.complete([Completion(sub.id, 1, b"zombie")]) == ["finished"]
    assert store.lookup([sub.id])[0].result == b"current"


def test_heartbeat_through_another_broker_keeps_the_lease(store: Store, db) -> None:
    (sub,) = store.enqueue([TaskSpec("q", b"x", lease_timeout=0.5)])
    a = store.acquire_broker("a", "tcp://a", 30)
    b = store.acquire_broker("b", "tcp://b", 30)
    (task,) = store.lease(a, "q", 1)
    store.start(a, [Ack(task.id, task.attempt)])
    for _ in range(4):
        time.sleep(0.25)
        assert store.renew(b, [Ack(task.id, task.attempt)]) == ["ok"]
        assert store.reap().running == 0
    assert _task_row(db, sub.id) == ("running", 1, 0, b.epoch)
    assert store.complete([Completion(task.id, task.attempt)]) == ["ok"]


def test_expired_broker_lease_returns_its_buffer_and_fences_it(store: Store, db) -> None:
    (sub,) = store.enqueue([TaskSpec("q", b"x")])
    a = store.acquire_broker("a", "tcp://a", 0.2)
    (task,) = store.lease(a, "q", 1)
    assert store.reap().buffered == 0  # live lease: its buffer is its own
    time.sleep(0.3)
    with pytest.raises(BrokerLeaseLost):
        store.renew_broker(a, 30)
    with pytest.raises(BrokerLeaseLost):
        store.lease(a, "q", 1)
    assert store.reap().buffered == 1
    assert _task_row(db, sub.id) == ("pending", 1, 0, None)
    b = store.acquire_broker("b", "tcp://b", 30)
    assert store.lease(b, "q", 1)[0].attempt == 2
    assert store.start(a, [Ack(task.id, 1)]) == ["stale"]


def test_a_new_epoch_fences_the_old_incarnation(store: Store, db) -> None:
    store.enqueue([TaskSpec("q", b"x") for _ in range(2)])
    old = store.acquire_broker("a", "tcp://a", 30)
    (task,) = store.lease(old, "q", 1)
    new = store.acquire_broker("a", "tcp://a", 30)
    assert new.epoch > old.epoch
    with pytest.raises(BrokerLeaseLost):
        store.lease(old, "q", 1)
    assert store.start(old, [Ack(task.id, task.attempt)]) == ["stale"]
    assert store.reap().buffered == 1  # the old incarnation's buffer goes back
    assert len(store.lease(new, "q", 10)) == 2


def test_release_gives_back_without_counting_a_failure(store: Store, db) -> None:
    (sub,) = store.enqueue([TaskSpec("q", b"x")])
    owner = store.acquire_broker("a", "tcp://a", 30)
    (task,) = store.lease(owner, "q", 1)
    assert store.release([Ack(task.id, task.attempt)]) == ["ok"]
    assert _task_row(db, sub.id) == ("pending", 1, 0, None)
    assert store.complete([Completion(task.id, task.attempt)]) == ["stale"]
    assert store.lease(owner, "q", 1)[0].attempt == 2


def test_cancel_refuses_the_running_delivery(store: Store) -> None:
    (sub,) = store.enqueue([TaskSpec("q", b"x")])
    owner = store.acquire_broker("a", "tcp://a", 30)
    (task,) = store.lease(owner, "q", 1)
    assert store.cancel([sub.id, 424242]) == ["ok", "unknown"]
    assert store.complete([Completion(task.id, task.attempt)]) == ["cancelled"]
    assert store.cancel([sub.id]) == ["cancelled"]
    assert store.lookup([sub.id])[0].state == "cancelled"


def test_outcomes_follow_id_and_attempt_within_one_batch(store: Store) -> None:
    """Group commit merges workers' rows: a zombie's row beside the holder's is still refused."""
    (sub,) = store.enqueue([TaskSpec("q", b"x")])
    owner = store.acquire_broker("a", "tcp://a", 30)
    store.release([Ack(t.id, t.attempt) for t in store.lease(owner, "q", 1)])
    (task,) = store.lease(owner, "q", 1)
    assert task.attempt == 2
    assert store.renew(owner, [Ack(sub.id, 1), Ack(sub.id, 2)]) == ["stale", "ok"]
    both = [Completion(sub.id, 1, b"zombie"), Completion(sub.id, 2, b"holder")]
    assert store.complete(both) == ["finished", "ok"]
    assert store.lookup([sub.id])[0].result == b"holder"


def test_backoff_does_not_overflow_after_many_failures(store: Store, db) -> None:
    owner = store.acquire_broker("a", "tcp://a", 30)
    (sub,) = store.enqueue([TaskSpec("q", b"x", max_attempts=5000, backoff_base=1, backoff_max=2)])
    db.query("UPDATE tasks SET failures = 1500 WHERE id = %s RETURNING id", (sub.id,))
    (task,) = store.lease(owner, "q", 1)
    assert store.fail([Failure(task.id, task.attempt, "again")]) == ["ok"]
    (delay,) = db.query("SELECT extract(epoch FROM run_at - now()) FROM tasks WHERE id = %s", (sub.id,))[0]
    assert 0.9 <= delay <= 2


def test_an_own_backlog_is_read_back_without_a_write_and_given_back_by_span(store: Store, db) -> None:
    a = store.acquire_broker("a", "tcp://a", 30)
    b = store.acquire_broker("b", "tcp://b", 30)
    mine = store.insert([TaskSpec("q", b"%d" % i) for i in range(4)], [True] * 4, a)
    other = store.insert([TaskSpec("q", b"o")], [True], b)
    assert all(s.owned for s in mine + other)
    lo, hi = mine[0].id, other[0].id
    got = store.read_back(a, "q", (lo, hi), 3)
    assert [(t.id, t.attempt) for t in got] == [(s.id, 1) for s in mine[:3]]
    assert store.read_back(b, "q", (lo, hi), 10)[0].id == other[0].id  # each reads only its own
    assert store.release_spans(a, [("q", mine[3].id, hi)]) == 1  # b's task in the span stays b's
    assert db.query("SELECT id, state FROM live_tasks ORDER BY id")[3:] == [
        (mine[3].id, "pending"),
        (other[0].id, "buffered"),
    ]
    assert store.complete([Completion(t.id, 1) for t in got]) == ["ok"] * 3
    assert store.queue_stats()["q"] == {"pending": 1, "buffered": 1, "completed": 3}


def test_the_reaper_yields_to_a_writer_instead_of_waiting_into_a_deadlock(store: Store, db) -> None:
    """A row of a dead broker's that a commit holds: the reaper gives up at once (100 ms) and
    returns it on a later pass, so a deadlock never picks the commit as its victim."""
    gone = store.acquire_broker("gone", "tcp://gone", 30)
    (sub,) = store.insert([TaskSpec("q", b"x")], [True], gone)
    store.drop_broker(gone)
    with db.store() as writer, writer.conn.transaction():
        writer.conn.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", (sub.id,))
        began = time.monotonic()
        assert store.reap() == Reaped(0, 0)
        assert time.monotonic() - began < 1.0  # deadlock_timeout: it never waited that long
    assert store.reap() == Reaped(1, 0)
    assert _task_row(db, sub.id)[:2] == ("pending", 1)
