"""What `conduit top` and the dashboard read (conduit.observe, and the Store's `brokers` and
`discard`), on real PostgreSQL: rates from counter deltas, broker leases from the table, dead
tasks discarded with the counters kept equal to the rows."""

from __future__ import annotations

import pytest
from test_store_ops import finish, truth

from conduit.errors import DatabaseError
from conduit.observe import Observer, Rates
from conduit.store import Store
from conduit.task import TaskSpec


def test_rates_are_counter_deltas_between_readings() -> None:
    rates = Rates(keep=10)
    assert rates.last("q") is None
    rates.add(100.0, {"q": {"pending": 10}})
    assert rates.last("q") is None  # one reading: no rate yet
    rates.add(102.0, {"q": {"pending": 14, "completed": 6}})  # 10 more in, 6 out, in 2 s
    assert rates.last("q") == (5.0, 3.0)
    rates.add(104.0, {"q": {"pending": 4, "completed": 3}})  # a prune took finished ones away
    assert rates.last("q") == (0.0, 0.0)
    rates.add(111.0, {"q": {"pending": 4, "completed": 3}, "r": {"dead": 7}})
    assert [t for t, _, _ in rates.series("q")] == [104.0, 111.0]  # older than 10 s: dropped
    assert rates.last("r") == (1.0, 1.0)  # a queue that appeared: counted from nothing


def test_brokers_lists_leases_live_and_ended(store: Store) -> None:
    old = store.acquire_broker("obs-b1", "tcp://127.0.0.1:1", 30)
    new = store.acquire_broker("obs-b1", "tcp://127.0.0.1:2", 30)  # a restart ends the old lease
    other = store.acquire_broker("obs-b2", "tcp://127.0.0.1:3", 30)
    store.drop_broker(other)
    rows = {r.epoch: r for r in store.brokers()}
    assert [(r.broker, r.epoch) for r in store.brokers()] == [
        ("obs-b1", new.epoch),
        ("obs-b1", old.epoch),
        ("obs-b2", other.epoch),
    ]
    assert rows[new.epoch].live and 29 < rows[new.epoch].lease_left <= 30
    assert not rows[old.epoch].live and rows[old.epoch].lease_left <= 0
    assert not rows[other.epoch].live and rows[new.epoch].endpoint == "tcp://127.0.0.1:2"


def test_discard_drops_dead_tasks_only(store: Store, db) -> None:
    dead = finish(store, "obs", 3, fail=True)
    done = finish(store, "obs", 1)
    (live,) = [s.id for s in store.enqueue([TaskSpec("obs", b"live")])]
    assert store.discard([dead[0], dead[1], *done, live, 10**12]) == dead[:2]
    assert store.show(dead)[0].id == dead[2]  # the discarded are gone, the third is kept
    assert {i.state for i in store.lookup([*done, live])} == {"completed", "pending"}
    assert store.queue_stats() == truth(db) == {"obs": {"dead": 1, "completed": 1, "pending": 1}}


def test_observer_reconnects_after_losing_its_connection(db) -> None:
    with db.store() as store:
        store.enqueue([TaskSpec("obs", b"x")])
    observer = Observer(db.dsn, db.schema)
    try:
        assert [(q.name, q.depth) for q in observer.queues()] == [("obs", 1)]
        assert observer._store is not None
        db.query("SELECT pg_terminate_backend(%s)", (observer._store.conn.info.backend_pid,))
        with pytest.raises(DatabaseError, match=r"^database: "):
            observer.queues()
        assert [(q.name, q.depth) for q in observer.queues()] == [("obs", 1)]
    finally:
        observer.close()
