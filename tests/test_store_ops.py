"""The Store's operations for people (conduit.store.ops) against real PostgreSQL: listings page by
keyset from indexes, and every operation that moves tasks keeps the counters equal to the rows."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from conduit.errors import ConduitError
from conduit.store import Store
from conduit.store.ops import BadCursor
from conduit.store.queries import QUERIES
from conduit.task import Completion, Failure, Outcome, TaskSpec


def truth(db) -> dict[str, dict[str, int]]:
    """Per queue and state, counted from the rows themselves (what the counters must equal)."""
    rows = db.query(
        "SELECT queue, state, count(*) FROM (SELECT queue, state FROM live_tasks"
        " UNION ALL SELECT queue, state FROM results) t GROUP BY 1, 2"
    )
    found: dict[str, dict[str, int]] = {}
    for queue, state, n in rows:
        found.setdefault(str(queue), {})[str(state)] = int(n)  # type: ignore[call-overload]
    return found


def finish(store: Store, queue: str, n: int, *, fail: bool = False) -> list[int]:
    """n tasks of `queue` leased and completed (or failed for good): the ids. Call it before
    leaving other tasks pending in `queue`: it leases the first due."""
    ids = [s.id for s in store.enqueue([TaskSpec(queue, b"x%d" % i, max_attempts=1) for i in range(n)])]
    owner = store.acquire_broker(f"b-{queue}", "tcp://x:1", 30)
    leased = store.lease(owner, queue, n)
    if fail:
        store.fail([Failure(t.id, t.attempt, f"boom {t.id}") for t in leased])
    else:
        store.complete([Completion(t.id, t.attempt, b"r") for t in leased])
    return ids


def all_pages(store: Store, **filters: object) -> list[list[int]]:
    pages, after = [], None
    while True:
        page = store.list_tasks(limit=2, after=after, **filters)  # type: ignore[arg-type]
        pages.append([r.id for r in page.rows])
        if page.next is None:
            return pages
        after = page.next


def test_pending_tasks_page_in_the_order_they_run(store: Store, db) -> None:
    specs = [TaskSpec("b", b"1", priority=5), TaskSpec("a", b"2"), TaskSpec("b", b"3", priority=-1)]
    specs += [TaskSpec("b", b"4", priority=5), TaskSpec("b", b"5", priority=5, delay=3600)]
    ids = [s.id for s in store.enqueue(specs)]
    assert all_pages(store, state="pending", queue="b") == [[ids[2], ids[0]], [ids[3], ids[4]], []]
    flat = [i for p in all_pages(store, state="pending") for i in p]
    assert flat == [ids[1], ids[2], ids[0], ids[3], ids[4]]  # by queue, then as they run
    # --older-than / --newer-than on when a task came due: the delayed one is due in an hour
    assert [r.id for r in store.list_tasks(state="pending", queue="b", older_than=0).rows] == [
        ids[2],
        ids[0],
        ids[3],
    ]
    with psycopg.connect(db.dsn, autocommit=True) as conn:  # queue a's task came due two hours ago
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(db.schema)))
        conn.execute("UPDATE tasks SET run_at = now() - interval '2 hours' WHERE id = %s", (ids[1],))
    assert [r.id for r in store.list_tasks(state="pending", newer_than=3600).rows] == [
        ids[2],
        ids[0],
        *ids[3:],
    ]
    assert [r.id for r in store.list_tasks(state="pending", older_than=3600).rows] == [ids[1]]
    row = store.list_tasks(state="pending", queue="a").rows[0]
    assert (row.queue, row.state, row.attempt, row.failures) == ("a", "pending", 0, 0)


def test_live_tasks_list_by_id_with_their_broker(store: Store, db) -> None:
    ids = [s.id for s in store.enqueue([TaskSpec("q", b"%d" % i) for i in range(4)])]
    owner = store.acquire_broker("b1", "tcp://x:1", 30)
    leased = store.lease(owner, "q", 2)
    store.renew(owner, [Completion(leased[0].id, leased[0].attempt)])  # heartbeated: running
    rows = store.list_tasks().rows
    assert [(r.id, r.state) for r in rows] == [
        (ids[0], "running"),
        (ids[1], "buffered"),
        (ids[2], "pending"),
        (ids[3], "pending"),
    ]
    assert rows[0].broker == rows[1].broker == "b1" and rows[2].broker is None
    assert [r.id for r in store.list_tasks(state="buffered").rows] == [ids[1]]
    assert all_pages(store, state="running") == [[ids[0]]]
    assert all_pages(store) == [ids[:2], ids[2:], []]


def test_finished_tasks_page_newest_first_across_history_and_batches(store: Store, db) -> None:
    done = finish(store, "q", 3)  # one completions row
    dead = finish(store, "q", 2, fail=True)  # history rows
    also = finish(store, "r", 1)
    assert all_pages(store, state="completed", queue="q") == [[done[2], done[1]], [done[0]]]
    assert [i for p in all_pages(store, state="completed") for i in p] == [also[0], done[2], done[1], done[0]]
    rows = store.list_tasks(state="dead").rows
    assert [r.id for r in rows] == dead[::-1] and rows[0].error == f"boom {dead[1]}"
    assert store.list_tasks(state="completed", older_than=3600).rows == []
    assert len(store.list_tasks(state="completed", newer_than=3600).rows) == 4
    assert store.list_tasks(state="cancelled").rows == []


def test_a_cursor_belongs_to_its_listing(store: Store) -> None:
    store.enqueue([TaskSpec("q", b"1"), TaskSpec("q", b"2")])
    cursor = store.list_tasks(state="pending", limit=1).next
    assert cursor is not None
    with pytest.raises(BadCursor, match="not one this listing printed"):
        store.list_tasks(state="dead", after=cursor)
    with pytest.raises(BadCursor):
        store.list_tasks(after="garbage")


def test_listings_are_read_from_indexes(store: Store, db) -> None:
    """With sequential scans ruled out, each listing still has a plan: an index serves it (and
    no COUNT is anywhere near)."""
    store.enqueue([TaskSpec("q", b"1")])
    finish(store, "q", 1)
    params = {"queue": "q", "older": None, "newer": None, "limit": 10, "k_id": None, "k_queue": None}
    params |= {"k_priority": None, "k_at": None}
    store.conn.execute("SET enable_seqscan = off")
    plans = {}
    for name, state in (("list_pending", None), ("list_finished", "completed"), ("list_finished", "dead")):
        rows = store.conn.execute(b"EXPLAIN " + QUERIES[name].encode(), {**params, "state": state}).fetchall()
        plans[(name, state)] = "\n".join(r[0] for r in rows)
    assert "queue_priority_run_at_id_idx on tasks_0" in plans[("list_pending", None)]  # tasks_due's copies
    assert "completions_2" in plans[("list_finished", "completed")]  # the partitions' copies
    assert "queue_finished_at" in plans[("list_finished", "completed")]
    assert "queue_state_finished_at" in plans[("list_finished", "dead")]
    assert all("Seq Scan on tasks" not in p and "Seq Scan on history" not in p for p in plans.values())


def test_cancel_retry_and_the_counters(store: Store, db) -> None:
    (dead,) = finish(store, "q", 1, fail=True)
    (completed,) = finish(store, "q", 1)
    ids = [s.id for s in store.enqueue([TaskSpec("q", b"%d" % i) for i in range(3)])]
    owner = store.acquire_broker("b1", "tcp://x:1", 30)
    (held,) = store.lease(owner, "q", 1)  # ids[0], buffered by b1
    assert store.cancel([ids[0], ids[1], completed]) == [Outcome.OK, Outcome.OK, Outcome.FINISHED]
    assert (
        store.queue_stats() == truth(db) == {"q": {"pending": 1, "completed": 1, "dead": 1, "cancelled": 2}}
    )
    # The broker still has ids[0] in memory: its delivery's reports are refused.
    assert store.complete([Completion(held.id, held.attempt, b"late")]) == [Outcome.CANCELLED]

    outcomes = store.retry([ids[0], ids[1], dead, completed, ids[2], 10**12])
    assert outcomes == [Outcome.OK, Outcome.OK, Outcome.OK, Outcome.FINISHED, Outcome.LIVE, Outcome.UNKNOWN]
    assert store.queue_stats() == truth(db) == {"q": {"pending": 4, "completed": 1}}
    assert store.retry([ids[0]]) == [Outcome.LIVE]  # nothing twice
    back = {r.id: r for r in store.list_tasks(state="pending").rows}
    assert back[dead].failures == 0 and back[dead].error == f"boom {dead}"  # forgiven, error kept
    # The retried task keeps its attempt: the delivery from before the cancel stays fenced off,
    # even once a broker leases it again (attempt + 1).
    assert store.complete([Completion(held.id, held.attempt, b"late")]) == [Outcome.STALE]
    again = [t for t in store.lease(owner, "q", 10) if t.id == held.id]
    assert again[0].attempt == held.attempt + 1
    assert store.complete([Completion(held.id, held.attempt, b"late")]) == [Outcome.STALE]
    assert store.queue_stats() == truth(db)


def test_purge_cancels_what_has_not_started_and_leaves_running_tasks(store: Store, db) -> None:
    ids = [s.id for s in store.enqueue([TaskSpec("q", b"%d" % i) for i in range(6)])]
    (other,) = [s.id for s in store.enqueue([TaskSpec("keep", b"x")])]
    owner = store.acquire_broker("b1", "tcp://x:1", 30)
    leased = store.lease(owner, "q", 3)  # buffered by the broker
    store.renew(owner, [Completion(leased[0].id, leased[0].attempt)])  # one is running
    assert store.purge("q") == 5
    assert [r.id for r in store.list_tasks(queue="q").rows] == [leased[0].id]
    assert {r.id for r in store.list_tasks(state="cancelled", queue="q").rows} == set(ids) - {leased[0].id}
    assert store.list_tasks(queue="keep").rows[0].id == other
    assert store.queue_stats() == truth(db) == {"q": {"running": 1, "cancelled": 5}, "keep": {"pending": 1}}
    assert store.complete([Completion(leased[1].id, leased[1].attempt)]) == [Outcome.CANCELLED]
    assert store.retry([ids[5]]) == [Outcome.OK]  # a purge can be undone task by task
    assert store.purge("q") == 1 and store.purge("empty") == 0
    assert store.queue_stats() == truth(db)


def test_purge_goes_a_batch_at_a_time(store: Store, db, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("conduit.store.ops.PURGE_BATCH", 3)
    store.enqueue([TaskSpec("q", b"%d" % i) for i in range(7)])
    assert store.purge("q") == 7
    assert store.queue_stats() == truth(db) == {"q": {"cancelled": 7}}


def test_redrive_all_and_show(store: Store, db) -> None:
    dead = finish(store, "q", 3, fail=True)
    (done,) = finish(store, "q", 1)
    assert store.redrive_all("q") == 3 and store.redrive_all("q") == 0
    assert store.queue_stats() == truth(db) == {"q": {"pending": 3, "completed": 1}}
    (key,) = store.enqueue([TaskSpec("q", b"\xff\x00", priority=7, max_attempts=9, idempotency_key="k")])
    shown = store.show([key.id, done, 10**12, dead[0]])
    assert [d.id for d in shown] == [key.id, done, dead[0]]  # unknown ids left out
    live, completed, back = shown
    assert (live.state, live.priority, live.max_attempts, live.idempotency_key) == ("pending", 7, 9, "k")
    assert live.payload == b"\xff\x00" and live.run_at is not None and live.finished_at is None
    assert (completed.state, completed.result, completed.payload) == ("completed", b"r", None)
    assert completed.finished_at is not None
    assert (back.state, back.failures, back.error) == ("pending", 0, f"boom {dead[0]}")


def test_a_pause_is_durable_and_wakes_listening_brokers(store: Store, db) -> None:
    listener = db.store()
    try:
        listener.listen()
        assert store.pause("mail") is True
        assert store.pause("mail") is False  # already paused: nothing changes
        assert list(store.paused()) == ["mail"]
        assert [n.payload for n in listener.conn.notifies(timeout=2, stop_after=1)] == ["!paused"]
        assert store.resume("mail") is True
        assert store.resume("mail") is False
        assert store.paused() == {}
        with pytest.raises(ConduitError, match="not valid"):
            store.pause("no spaces")
    finally:
        listener.close()
