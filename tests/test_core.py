"""The broker's sans-IO core, driven directly: no sockets, no database, no clock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgpack

from conduit.broker import core
from conduit.broker.core import Config, Core
from conduit.broker.events import (
    Acquired,
    Leased,
    LeaseRenewed,
    Notified,
    Operated,
    PeersRead,
    Received,
    SendFailed,
    Shutdown,
    Tick,
    Written,
)
from conduit.broker.writes import REPORTS, SUBMITS, SubmitOp, WriteBatch, WriteResult
from conduit.store import BrokerLease, Peer
from conduit.task import Ack, LeasedTask, Outcome, Submitted, TaskSpec
from conduit.wire import DELIVER_COLUMNS, PREVIOUS, PROTOCOL, Command, decode, encode

WORKER = b"peer-worker"
CLIENT = b"peer-client"
OWNER = BrokerLease("b1", 1)


def make_core(**overrides: Any) -> Core:
    c = Core(Config(broker_id="b1", **overrides))
    c.handle(Acquired(OWNER, 0.0))
    return c


def request(c: Core, peer: bytes, command: str, now: float = 0.0, **body: Any) -> list[core.Action]:
    return c.handle(Received(peer, encode(Command(command), body), now))


def sent(actions: list[core.Action], peer: bytes | None = None) -> list[tuple[str, dict[str, Any]]]:
    """What was sent, decoded; a refusal framed for a conduit/1 peer is decoded too."""
    out = []
    for a in actions:
        if isinstance(a, core.Send) and (peer is None or a.peer == peer):
            frames = [PROTOCOL, *a.frames[1:]] if a.frames[0] == PREVIOUS else a.frames
            msg = decode(frames, allowed=frozenset(Command))
            out.append((msg.command.value, msg.body))
    return out


def empty(rid: int) -> dict[str, Any]:
    """An empty DELIVER's body: every column there, and empty."""
    return {"rid": rid, "broker": "b1", **{name: [] for name in DELIVER_COLUMNS}}


def of(actions: list[core.Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def task(task_id: int, queue: str = "q", attempt: int = 1) -> LeasedTask:
    return LeasedTask(task_id, queue, 0, datetime.now(UTC), attempt, 0, 5, 30.0, b"p%d" % task_id)


def poll(
    c: Core, now: float = 0.0, rid: int = 1, queues: list[str] | None = None, **kw: Any
) -> list[core.Action]:
    return request(c, WORKER, "POLL", now, rid=rid, worker="w1", queues=queues or ["q"], **kw)


def drain(c: Core, queue: str = "q", now: float = 0.0) -> list[core.Action]:
    """A poll makes the core read; the read finds nothing, so the queue is known drained."""
    actions = poll(c, now)
    assert of(actions, core.Lease) == [core.Lease(queue, 500)]
    return c.handle(Leased(queue, [], None, now))


# -- bad input -------------------------------------------------------------------------------


def test_bad_frames_get_error_replies_and_change_nothing() -> None:
    c = make_core()
    cases = [
        ([b"garbage"], "bad_frames", None),
        ([b"conduit/3", b"PING", msgpack.packb({"rid": 5})], "bad_version", None),
        ([PREVIOUS, b"PING", msgpack.packb({"rid": 6})], "bad_version", 6),
        ([PROTOCOL, b"PING", b"\xc1\xc1"], "bad_frames", None),
        ([PROTOCOL, b"EXPLODE", msgpack.packb({"rid": 7})], "unknown_command", 7),
        (
            [PROTOCOL, b"POLL", msgpack.packb({"rid": 8, "worker": "w", "queues": ["bad queue!"]})],
            "invalid_task",
            8,
        ),
        (
            [
                PROTOCOL,
                b"SUBMIT",
                msgpack.packb({"rid": 9, "queue": "q", "payload": ["not bytes"]}),
            ],
            "bad_request",
            9,
        ),
        ([PROTOCOL, b"COMPLETE", msgpack.packb({"rid": 10, "id": [1]})], "bad_request", 10),
    ]
    for frames, code, rid in cases:
        actions = c.handle(Received(CLIENT, frames, 0.0))
        assert sent(actions) == [
            ("ERROR", {"rid": rid, "code": code, "message": sent(actions)[0][1]["message"]})
        ]
        assert of(actions, core.Log) and not of(actions, core.Write) and not of(actions, core.Lease)
        (reply,) = of(actions, core.Send)
        assert reply.frames[0] == (PREVIOUS if frames[0] == PREVIOUS else PROTOCOL)  # an old peer can read it
    assert c.queues == {} or all(not q.buffer and not q.waiters for q in c.queues.values())
    pong = {"rid": 11, "broker": "b1", "pub": None, "peers": []}
    assert sent(request(c, CLIENT, "PING", rid=11)) == [("PONG", pong)]


def test_oversized_payload_is_refused_with_advice() -> None:
    c = make_core(max_payload_bytes=10)
    actions = request(c, CLIENT, "SUBMIT", rid=1, queue="q", payload=[b"xxxxxxxxxxx"])
    ((command, body),) = sent(actions)
    assert command == "ERROR" and body["code"] == "invalid_task" and "reference" in body["message"]
    assert not of(actions, core.Write)


# -- buffered path ---------------------------------------------------------------------------


def test_poll_reads_a_batch_and_delivers_from_the_buffer() -> None:
    c = make_core(lease_batch=100, buffer_size=150)
    actions = poll(c, max=2)
    assert of(actions, core.Lease) == [core.Lease("q", 100)]
    assert sent(actions) == []
    actions = c.handle(Leased("q", [task(i) for i in range(1, 101)], None, 0.1))
    ((command, body),) = sent(actions, WORKER)
    assert command == "DELIVER" and body["id"] == [1, 2] and body["attempt"] == [1, 1]
    assert (
        body["broker"] == "b1" and body["payload"] == [b"p1", b"p2"] and body["lease_timeout"] == [30.0] * 2
    )
    assert of(actions, core.Write) == []  # a delivery from the buffer costs no write
    # The next poll is served from memory; below half a batch, the buffer is topped up, to its bound.
    actions = poll(c, now=0.2, rid=2, max=60)
    assert len(sent(actions, WORKER)[0][1]["id"]) == 60
    assert of(c.handle(Tick(0.3)), core.Lease) == [core.Lease("q", 100)]
    actions = poll(c, now=0.4, rid=3, max=100)
    assert len(sent(actions, WORKER)[0][1]["id"]) == 38
    assert of(actions, core.Lease) == []  # one read at a time
    c.handle(Leased("q", [task(i) for i in range(101, 201)], None, 0.5))
    assert c.depths()["q"] == (100, 0, 100)  # 100 buffered; 100 delivered, not yet heard of
    assert of(c.handle(Tick(5.0)), core.Lease) == []  # no poll for a while: no more reads


def test_poll_times_out_with_an_empty_delivery() -> None:
    c = make_core()
    drain(c)
    assert sent(c.handle(Tick(5.0))) == []
    assert sent(c.handle(Tick(10.0)), WORKER) == [("DELIVER", empty(1))]
    assert sent(poll(c, now=11.0, rid=2, timeout=0), WORKER) == [("DELIVER", empty(2))]


def test_drained_queue_is_read_again_after_the_recheck_interval() -> None:
    c = make_core(idle_recheck=0.5)
    drain(c)
    assert of(c.handle(Tick(0.2)), core.Lease) == []
    assert of(c.handle(Tick(0.6)), core.Lease) == [core.Lease("q", 500)]


# -- sync match ------------------------------------------------------------------------------


def test_submit_goes_straight_to_a_waiting_worker_after_commit() -> None:
    c = make_core()
    drain(c)
    actions = request(c, CLIENT, "SUBMIT", 0.1, rid=7, queue="q", payload=[b"hi"])
    assert sent(actions) == []  # nothing is acknowledged before the commit
    (write,) = of(actions, core.Write)
    (op,) = write.batch.submits
    assert op.waiters == [1] and op.owned == [True]
    actions = c.handle(Written(write.batch, WriteResult([[Submitted(42, True, True)]], []), None, 0.2))
    assert sent(actions, CLIENT) == [("SUBMITTED", {"rid": 7, "ids": [42], "created": [True]})]
    ((command, body),) = sent(actions, WORKER)
    assert command == "DELIVER" and body["rid"] == 1
    assert (body["id"], body["attempt"], body["payload"], body["broker"]) == ([42], [1], [b"hi"], "b1")
    assert (body["queue"], body["failures"], body["max_attempts"], body["lease_timeout"]) == (
        ["q"],
        [0],
        [5],
        [30.0],
    )


def test_no_sync_match_past_an_older_backlog_or_for_delayed_tasks() -> None:
    c = make_core(sync_match_window=5.0)
    poll(c)  # the first read is in flight: older tasks may be on their way
    actions = request(c, CLIENT, "SUBMIT", rid=2, queue="q", payload=[b"x"])
    assert of(actions, core.Write)[0].batch.submits[0].waiters == [None]
    c = make_core(sync_match_window=5.0)
    drain(c)
    actions = request(c, CLIENT, "SUBMIT", rid=3, queue="q", payload=[b"x"], delay=1.0)
    assert of(actions, core.Write)[0].batch.submits[0].waiters == [None]
    c = make_core(sync_match_window=5.0, idle_recheck=100)
    drain(c)
    actions = request(c, CLIENT, "SUBMIT", 6.0, rid=4, queue="q", payload=[b"x"])
    assert of(actions, core.Write)[0].batch.submits[0].waiters == [None]  # the drain is too old


def test_sync_match_fills_each_poll_up_to_its_max() -> None:
    c = make_core()
    drain(c)
    actions = request(c, CLIENT, "SUBMIT", rid=5, queue="q", payload=[b"%d" % i for i in range(3)])
    (op,) = of(actions, core.Write)[0].batch.submits
    assert op.waiters == [1, None, None]
    assert op.owned == [True, True, True]  # the rest are held for the buffer: its poll comes back


def test_sync_match_with_a_known_idempotency_key_keeps_the_poll_waiting() -> None:
    c = make_core()
    drain(c)
    actions = request(c, CLIENT, "SUBMIT", rid=5, queue="q", payload=[b"x"], idempotency_key="k")
    (write,) = of(actions, core.Write)
    actions = c.handle(Written(write.batch, WriteResult([[Submitted(9, False)]], []), None, 0.1))
    assert sent(actions, CLIENT) == [("SUBMITTED", {"rid": 5, "ids": [9], "created": [False]})]
    assert sent(actions, WORKER) == []
    assert sent(c.handle(Tick(10.0)), WORKER) == [("DELIVER", empty(1))]


def test_submit_key_rides_to_the_write_and_a_key_of_other_tasks_is_refused() -> None:
    c = make_core()
    drain(c)
    (write,) = of(
        request(c, CLIENT, "SUBMIT", rid=5, queue="q", payload=[b"x", b"y"], key="batch-1"), core.Write
    )
    (op,) = write.batch.submits
    assert op.key == "batch-1" and op.waiters == [1, None]
    actions = c.handle(Written(write.batch, WriteResult([None], []), None, 0.1))
    ((command, body),) = sent(actions, CLIENT)
    assert command == "ERROR" and body["code"] == "invalid_task" and "batch-1" in body["message"]
    assert sent(actions, WORKER) == []  # the poll it had reserved waits on, free again
    (write,) = of(request(c, CLIENT, "SUBMIT", 0.2, rid=6, queue="q", payload=[b"x"]), core.Write)
    assert write.batch.submits[0].waiters == [1]


def test_failed_commit_acknowledges_nothing_and_frees_the_poll() -> None:
    c = make_core()
    drain(c)
    actions = request(c, CLIENT, "SUBMIT", rid=5, queue="q", payload=[b"x"])
    (write,) = of(actions, core.Write)
    actions = c.handle(Written(write.batch, None, "OperationalError: server closed", 0.1))
    ((command, body),) = sent(actions, CLIENT)
    assert command == "ERROR" and body["code"] == "unavailable" and body["rid"] == 5
    assert sent(actions, WORKER) == []
    assert sent(c.handle(Tick(10.0)), WORKER) == [("DELIVER", empty(1))]


# -- group commit and fencing ----------------------------------------------------------------


def test_writes_arriving_during_a_commit_go_into_the_next_one() -> None:
    c = make_core()
    first = of(request(c, WORKER, "COMPLETE", rid=1, id=[1], attempt=[1], result=[b"r"]), core.Write)
    assert len(first) == 1
    assert of(request(c, WORKER, "COMPLETE", rid=2, id=[2], attempt=[3]), core.Write) == []
    assert of(request(c, WORKER, "FAIL", rid=3, id=[3], attempt=[1], error=["boom"]), core.Write) == []
    result = WriteResult([], [[Outcome.OK]])
    actions = c.handle(Written(first[0].batch, result, None, 0.1))
    assert sent(actions, WORKER) == [("ACK", {"rid": 1, "outcomes": ["ok"]})]
    (second,) = of(actions, core.Write)
    assert [(op.kind, op.rid) for op in second.batch.ops] == [("complete", 2), ("fail", 3)]
    actions = c.handle(Written(second.batch, WriteResult([], [[Outcome.STALE], [Outcome.OK]]), None, 0.2))
    assert sent(actions, WORKER) == [
        ("ACK", {"rid": 2, "outcomes": ["stale"]}),
        ("ACK", {"rid": 3, "outcomes": ["ok"]}),
    ]


def test_submits_and_reports_commit_in_lanes_of_their_own() -> None:
    """A submit never waits behind a commit of completions, nor a completion behind a submit's:
    each lane has one commit in flight, and what arrives meanwhile waits for that lane's next."""
    c = make_core()
    (report,) = of(request(c, WORKER, "COMPLETE", rid=1, id=[1], attempt=[1]), core.Write)
    (submit,) = of(request(c, CLIENT, "SUBMIT", rid=2, queue="q", payload=[b"x"]), core.Write)
    assert (report.lane, submit.lane) == (REPORTS, SUBMITS)
    assert [op.rid for op in submit.batch.submits] == [2] and submit.batch.ops == []
    assert [op.rid for op in report.batch.ops] == [1] and report.batch.submits == []
    assert of(request(c, CLIENT, "SUBMIT", rid=3, queue="q", payload=[b"y"]), core.Write) == []
    assert of(request(c, WORKER, "COMPLETE", rid=4, id=[2], attempt=[1]), core.Write) == []
    actions = c.handle(Written(submit.batch, WriteResult([[Submitted(7, True)]], []), None, 0.1))
    assert sent(actions, CLIENT) == [("SUBMITTED", {"rid": 2, "ids": [7], "created": [True]})]
    (next_submit,) = of(actions, core.Write)  # the completion still waits for its own lane
    assert (next_submit.lane, [op.rid for op in next_submit.batch.submits]) == (SUBMITS, [3])
    actions = c.handle(Written(report.batch, WriteResult([], [[Outcome.OK]]), None, 0.2))
    (next_report,) = of(actions, core.Write)
    assert (next_report.lane, [op.rid for op in next_report.batch.ops]) == (REPORTS, [4])


def test_a_full_write_queue_answers_busy() -> None:
    c = make_core(max_queued_requests=2)
    request(c, WORKER, "COMPLETE", rid=1, id=[1], attempt=[1])  # in flight
    request(c, WORKER, "COMPLETE", rid=2, id=[2], attempt=[1])
    request(c, WORKER, "COMPLETE", rid=3, id=[3], attempt=[1])
    ((command, body),) = sent(request(c, WORKER, "COMPLETE", rid=4, id=[4], attempt=[1]))
    assert (command, body["code"], body["rid"]) == ("ERROR", "busy", 4)


def test_operations_are_checked_on_the_loop_and_bounded_while_they_run() -> None:
    """A malformed operation never reaches the database; too many at once are told to wait."""
    c = make_core()
    ((command, body),) = sent(request(c, CLIENT, "LIST", rid=1, state="lost"))
    assert (command, body["code"]) == ("ERROR", "bad_request") and "lost" in body["message"]
    ((command, body),) = sent(request(c, CLIENT, "PURGE", rid=2, queue="no spaces"))
    assert (command, body["code"]) == ("ERROR", "invalid_task")
    ((command, body),) = sent(request(c, CLIENT, "LIST", rid=3, limit=0))
    assert (command, body["code"]) == ("ERROR", "bad_request")
    running = [of(request(c, CLIENT, "QUEUES", rid=10 + i), core.Operate) for i in range(core.MAX_OPERATIONS)]
    assert all(len(ops) == 1 for ops in running)
    ((command, body),) = sent(request(c, CLIENT, "QUEUES", rid=99))
    assert (command, body["code"], body["rid"]) == ("ERROR", "busy", 99)
    reply = encode(Command.QUEUE_LIST, {"rid": 10, "queue": [], "state": [], "count": []})
    assert sent(c.handle(Operated(CLIENT, reply))) == [
        ("QUEUE_LIST", {"rid": 10, "queue": [], "state": [], "count": []})
    ]
    (operate,) = of(request(c, CLIENT, "LIST", rid=100, queue="q", state="dead", limit=5), core.Operate)
    assert operate.operation.args == {
        "queue": "q",
        "state": "dead",
        "limit": 5,
        "after": None,
        "older_than": None,
        "newer_than": None,
    }


def test_undeliverable_tasks_are_released() -> None:
    c = make_core()
    poll(c)
    (send,) = of(c.handle(Leased("q", [task(1)], None, 0.1)), core.Send)
    assert [(row[0], row[1]) for row in send.delivered] == [(1, 1)]  # id, attempt
    (write,) = of(c.handle(SendFailed(WORKER, send.delivered)), core.Write)
    assert write.batch.releases == [Ack(1, 1)]
    c.handle(Written(write.batch, WriteResult([], []), None, 0.2))
    assert of(c.handle(Tick(100.0)), core.Write) == []  # released: nothing left to expire


def test_deliveries_never_heard_of_again_expire_after_their_lease() -> None:
    c = make_core()
    poll(c, max=3)
    c.handle(Leased("q", [task(1), task(2), task(3)], None, 0.1))  # lease_timeout 30 s each
    (heartbeat,) = of(
        request(c, WORKER, "HEARTBEAT", 10.0, rid=2, worker="w1", id=[1], attempt=[1]), core.Write
    )
    assert [op.kind for op in heartbeat.batch.ops] == ["renew"]  # now a task lease
    assert of(request(c, WORKER, "COMPLETE", 10.0, rid=3, id=[2], attempt=[1]), core.Write) == []
    (write,) = of(c.handle(Written(heartbeat.batch, WriteResult([], [[Outcome.OK]]), None, 10.1)), core.Write)
    assert [op.kind for op in write.batch.ops] == ["complete"]
    c.handle(Written(write.batch, WriteResult([], [[Outcome.OK]]), None, 10.2))
    assert of(c.handle(Tick(29.0)), core.Write) == []
    (expire,) = of(c.handle(Tick(30.2)), core.Write)
    assert expire.batch.expiries == [Ack(3, 1)]


def test_a_later_delivery_with_a_shorter_lease_expires_first() -> None:
    """Ticks skip the scan until the earliest deadline: a new, earlier one must move it."""
    c = make_core()
    poll(c, max=1)
    c.handle(Leased("q", [task(1), task(2)._replace(lease_timeout=5.0)], None, 0.1))  # 1 goes, 2 waits
    poll(c, now=1.0, rid=2, max=1)  # task 2 out now: due back at 6.0, before task 1 at 30.1
    assert of(c.handle(Tick(5.9)), core.Write) == []
    (expire,) = of(c.handle(Tick(6.1)), core.Write)
    assert expire.batch.expiries == [Ack(2, 1)]
    c.handle(Written(expire.batch, WriteResult([], []), None, 6.2))
    assert of(c.handle(Tick(30.0)), core.Write) == []
    (expire,) = of(c.handle(Tick(30.2)), core.Write)
    assert expire.batch.expiries == [Ack(1, 1)]


# -- the broker lease ------------------------------------------------------------------------


def test_unrenewed_lease_drops_the_buffer_before_delivering() -> None:
    c = make_core(lease_term=9.0)
    renew = of(c.handle(Tick(3.0)), core.RenewLease)
    assert renew == [core.RenewLease(3.0)]
    poll(c, now=3.0, max=1)
    c.handle(Leased("q", [task(1), task(2)], None, 3.1))
    # The renewal never comes back (the database or the broker stalled): past the term, buffered
    # tasks are no longer ours to hand out, and a new epoch is taken, so that what the database
    # holds under the old one is reaped even if the renewal went through after all.
    assert of(c.handle(Tick(9.5)), core.Reacquire) == [core.Reacquire()]
    actions = poll(c, now=9.5, rid=2)
    assert sent(actions, WORKER) == [] and c.depths()["q"][0] == 0
    assert of(actions, core.Lease) == []  # no reads without a lease
    assert c.handle(LeaseRenewed(True, 3.0, 9.6)) == []  # the old renewal, too late: ignored
    assert of(c.handle(Acquired(BrokerLease("b1", 2), 9.7)), core.Lease) == [core.Lease("q", 500)]


def test_a_write_of_held_tasks_that_failed_fences_the_epoch() -> None:
    """It may have committed unheard: tasks held under this epoch that the broker never buffered."""
    c = make_core()
    warm(c)
    (write,) = of(request(c, CLIENT, "SUBMIT", 0.1, rid=5, queue="q", payload=[b"x", b"y"]), core.Write)
    assert write.batch.submits[0].owned == [True, True]
    actions = c.handle(Written(write.batch, None, "AdminShutdown: terminating connection", 0.2))
    assert of(actions, core.Reacquire) == [core.Reacquire()] and c.owner is None


def test_lost_lease_drops_the_buffer_and_reacquires() -> None:
    c = make_core()
    poll(c, max=1)
    c.handle(Leased("q", [task(1), task(2)], None, 0.1))
    actions = c.handle(LeaseRenewed(False, 3.0, 3.1))
    assert of(actions, core.Reacquire) == [core.Reacquire()]
    assert c.depths()["q"][0] == 0
    assert of(poll(c, now=3.2, rid=2), core.Lease) == []  # no reads without a lease
    actions = c.handle(Acquired(BrokerLease("b1", 2), 3.3))
    assert of(actions, core.Lease) == [core.Lease("q", 500)]


# -- shutdown --------------------------------------------------------------------------------


def test_shutdown_answers_polls_releases_the_buffer_and_stops_after_the_last_commit() -> None:
    c = make_core()
    poll(c, max=1)
    c.handle(Leased("q", [task(1), task(2), task(3)], None, 0.1))  # task 1 delivered
    (first,) = of(request(c, WORKER, "COMPLETE", 0.2, rid=5, id=[7], attempt=[1]), core.Write)
    poll(c, now=0.2, rid=2, queues=["other"])
    actions = c.handle(Shutdown(0.3))
    assert sent(actions, WORKER) == [("DELIVER", empty(2))]
    ((command, body),) = sent(request(c, CLIENT, "SUBMIT", 0.4, rid=9, queue="q", payload=[b""]))
    assert (command, body["code"]) == ("ERROR", "shutting_down")
    actions = c.handle(Written(first.batch, WriteResult([], [[Outcome.OK]]), None, 0.5))
    (last,) = of(actions, core.Write)
    assert last.batch.releases == [Ack(2, 1), Ack(3, 1)]
    assert last.batch.starts == [Ack(1, 1)]  # its worker keeps it, heartbeating elsewhere
    assert not c.stopped
    actions = c.handle(Written(last.batch, WriteResult([], []), None, 0.6))
    assert of(actions, core.Stop) == [core.Stop(OWNER)] and c.stopped


def test_a_stopping_broker_says_so_at_once_and_answers_everyone_until_it_exits() -> None:
    """Nobody waits on a stopping broker: gossip says `stopping` at once; after its last commit
    it writes nothing more but answers every request (PONG, or shutting_down) for a linger."""
    c = make_core(pub_endpoint="tcp://x:2", stop_linger=0.5)
    c.handle(Tick(0.0))
    actions = c.handle(Shutdown(0.1))
    (told,) = gossip(actions)  # not on the next interval: now
    assert told["stopping"] is True
    assert of(actions, core.Stop) == [core.Stop(OWNER)] and c.stopped  # nothing left to commit
    assert not c.finished(0.55)
    for command, body in [
        ("HEARTBEAT", {"id": [1], "attempt": [1]}),
        ("COMPLETE", {"id": [1], "attempt": [1]}),
        ("SUBMIT", {"queue": "q", "payload": [b""]}),
        ("POLL", {"worker": "w", "queues": ["q"], "max": 1, "timeout": 5}),
        ("RESULT", {"ids": [1]}),
    ]:
        actions = request(c, WORKER, command, 0.3, rid=7, **body)
        ((reply, error),) = sent(actions)
        assert (reply, error["rid"], error["code"]) == ("ERROR", 7, "shutting_down")
        assert not of(actions, core.Write) and not of(actions, core.Lookup)
    assert sent(request(c, WORKER, "PING", 0.4, rid=8))[0][0] == "PONG"
    assert c.handle(Leased("q", [task(1)], None, 0.4)) == []  # a late read changes nothing now
    (still,) = gossip(c.handle(Tick(0.61)))
    assert still["stopping"] is True and c.finished(0.65)


def test_a_delivery_stays_tracked_until_its_report_commits() -> None:
    """Regression: a heartbeat whose commit failed must not stop the delivery from expiring."""
    c = make_core()
    poll(c, max=1)
    c.handle(Leased("q", [task(1)], None, 0.1))
    (write,) = of(request(c, WORKER, "HEARTBEAT", 1.0, rid=2, worker="w1", id=[1], attempt=[1]), core.Write)
    c.handle(Written(write.batch, None, "OperationalError: connection lost", 1.1))
    (expire,) = of(c.handle(Tick(30.2)), core.Write)
    assert expire.batch.expiries == [Ack(1, 1)]


def test_a_failing_database_is_retried_with_a_pause_and_does_not_block_shutdown() -> None:
    c = make_core()
    (write,) = of(c.handle(SendFailed(WORKER, (Ack(1, 1),))), core.Write)
    assert of(c.handle(Written(write.batch, None, "down", 1.0)), core.Write) == []
    assert of(c.handle(Tick(1.2)), core.Write) == []  # no hot loop against a dead database
    (retry,) = of(c.handle(Tick(1.6)), core.Write)
    assert retry.batch.releases == [Ack(1, 1)]
    c.handle(Shutdown(1.7))
    actions = c.handle(Written(retry.batch, None, "still down", 2.0))
    assert of(actions, core.Stop) == [core.Stop(OWNER)] and c.stopped  # gave up: leases expire instead


def test_deliveries_are_capped_in_bytes() -> None:
    c = make_core()
    poll(c, max=10)
    big = [
        LeasedTask(i, "q", 0, datetime.now(UTC), 1, 0, 5, 30.0, b"x" * (3 * 1024 * 1024)) for i in range(4)
    ]
    (send,) = of(c.handle(Leased("q", big, None, 0.1)), core.Send)
    assert [row[0] for row in send.delivered] == [0, 1]  # 6 MiB; a third would pass 8 MiB
    (send,) = of(poll(c, now=0.2, rid=2, max=10), core.Send)
    assert [row[0] for row in send.delivered] == [2, 3]


# -- the mesh ----------------------------------------------------------------------------------


def gossip(actions: list[core.Action]) -> list[dict[str, Any]]:
    return [decode(a.frames, allowed=frozenset({Command.GOSSIP})).body for a in of(actions, core.Publish)]


def test_gossip_every_interval_and_at_once_on_a_big_change() -> None:
    c = make_core(pub_endpoint="tcp://x:2", gossip_every=0.5)
    (first,) = gossip(c.handle(Tick(0.0)))
    assert first["broker"] == "b1" and first["pub"] == "tcp://x:2" and first["queues"] == {}
    assert gossip(c.handle(Tick(0.2))) == []
    (polled,) = gossip(poll(c, now=0.3) + c.handle(Tick(0.3)))  # a queue gained a poll: at once
    assert polled["queues"] == {"q": [0, 1, 0]} and polled["seq"] == 2
    assert gossip(c.handle(Tick(0.35))) == []
    (periodic,) = gossip(c.handle(Tick(0.85)))
    assert periodic["queues"] == {"q": [0, 1, 0]}


def test_pong_and_gossip_name_the_live_peers_last_read() -> None:
    c = make_core(pub_endpoint="tcp://x:2", gossip_every=0.5)
    c.handle(PeersRead((Peer("b2", "tcp://y:1", "tcp://y:2"), Peer("b3", "tcp://z:1", None))))
    named = [
        {"broker": "b2", "endpoint": "tcp://y:1", "pub": "tcp://y:2"},
        {"broker": "b3", "endpoint": "tcp://z:1", "pub": None},
    ]
    ((_, pong),) = sent(request(c, CLIENT, "PING", rid=1))
    (said,) = gossip(c.handle(Tick(0.0)))
    assert pong["peers"] == said["peers"] == named
    c.handle(PeersRead(()))  # they stopped: read again with the next lease renewal
    assert sent(request(c, CLIENT, "PING", rid=2))[0][1]["peers"] == []


def test_unpolled_buffer_goes_back_and_submits_wake_other_brokers() -> None:
    c = make_core(idle_release=2.0)
    poll(c, max=1)
    c.handle(Leased("q", [task(1), task(2), task(3)], None, 0.1))  # 1 delivered, 2 buffered
    assert of(c.handle(Tick(2.0)), core.Write) == []  # polls were served lately
    (release,) = of(c.handle(Tick(3.2)), core.Write)
    assert release.batch.releases == [Ack(2, 1), Ack(3, 1)] and c.depths()["q"][0] == 0
    c.handle(Written(release.batch, WriteResult([], []), None, 3.3))
    (write,) = of(request(c, CLIENT, "SUBMIT", 4.0, rid=9, queue="z", payload=[b""] * 2), core.Write)
    assert write.batch.notify == ["z"]  # once per queue, however many tasks
    c.handle(Written(write.batch, WriteResult([[Submitted(5, True), Submitted(6, True)]], []), None, 4.01))
    (again,) = of(request(c, CLIENT, "SUBMIT", 4.05, rid=10, queue="z", payload=[b""]), core.Write)
    assert again.batch.notify == []  # debounced: NOTIFY takes a global lock at commit


def test_a_wake_up_makes_a_drained_queue_read_at_once() -> None:
    c = make_core(idle_recheck=10.0)
    drain(c)
    assert of(c.handle(Tick(1.0)), core.Lease) == []
    assert of(c.handle(Notified("q", 1.1)), core.Lease) == [core.Lease("q", 500)]


def test_answered_polls_leave_no_garbage_behind() -> None:
    """Bounded memory: an idle queue long-polled forever keeps no trace of old polls."""
    c = make_core()
    for i in range(1000):
        poll(c, now=float(i), rid=i, timeout=0.5)
        c.handle(Tick(i + 0.6))
    assert len(c._waiters) == 0 and len(c.queues["q"].waiters) <= 16 + 2


def test_a_poll_sync_matched_in_one_commit_takes_nothing_from_the_next() -> None:
    """Regression: a poll reserved in the write in flight was reserved again in the next batch;
    the first commit answered it, and the second batch's tasks (running, attempt 1) were never
    delivered: stuck until their lease expired."""
    c = make_core()
    assert of(poll(c, max=5), core.Lease) == [core.Lease("q", 500)]
    c.handle(Leased("q", [], None, 0.0))  # drained: sync match is on
    (first,) = of(request(c, CLIENT, "SUBMIT", 0.2, rid=7, queue="q", payload=[b"a"]), core.Write)
    assert [w for op in first.batch.submits for w in op.waiters] == [1]
    assert request(c, CLIENT, "SUBMIT", 0.3, rid=8, queue="q", payload=[b"b"]) == []
    actions = c.handle(Written(first.batch, WriteResult([[Submitted(1, True, True)]], []), None, 0.4))
    assert [i for _, body in sent(actions, WORKER) for i in body["id"]] == [1]
    (second,) = of(actions, core.Write)
    assert [w for op in second.batch.submits for w in op.waiters] == [None]  # enqueued for the next poll


def test_a_fresh_buffer_is_not_given_back_at_once() -> None:
    """Regression: a batch read for a poll that sync match answered meanwhile was released on the
    next tick (nobody had been served from it yet), then leased again: attempts grew for nothing."""
    c = make_core(idle_recheck=0.5)
    drain(c)  # poll 1 waits; the read at t=0 found nothing
    assert of(c.handle(Tick(0.6)), core.Lease) == [core.Lease("q", 500)]  # the re-read
    (write,) = of(request(c, CLIENT, "SUBMIT", 0.7, rid=7, queue="q", payload=[b"a"]), core.Write)
    c.handle(Written(write.batch, WriteResult([[Submitted(1, True, True)]], []), None, 0.8))  # poll answered
    c.handle(Leased("q", [task(i) for i in range(2, 502)], None, 0.9))  # nobody waits for these now
    assert of(c.handle(Tick(1.0)), core.Write) == []
    assert of(c.handle(Tick(3.5)), core.Write) == []
    (release,) = of(c.handle(Tick(4.0)), core.Write)  # idle for real now
    assert len(release.batch.releases) == 500


# -- tasks inserted held: the write-once path -----------------------------------------------


def warm(c: Core, max_tasks: int = 1, timeout: float = 10.0) -> None:
    """A poll served from a read (so the queue is wanted here), then one waiting on a drained queue."""
    poll(c, max=1)
    c.handle(Leased("q", [task(1)], None, 0.0))  # fewer than asked: drained too
    assert sent(poll(c, 0.01, rid=2, max=max_tasks, timeout=timeout)) == []


def submit_and_commit(c: Core, n: int, now: float, first_id: int, rid: int = 50) -> list[core.Action]:
    (write,) = of(
        request(c, CLIENT, "SUBMIT", now, rid=rid, queue="q", payload=[b"%d" % i for i in range(n)]),
        core.Write,
    )
    (op,) = write.batch.submits
    subs = [Submitted(first_id + i, True, owned) for i, owned in enumerate(op.owned)]
    return c.handle(Written(write.batch, WriteResult([subs], []), None, now + 0.01))


def test_tasks_of_a_drained_polled_queue_are_held_and_overflow_into_an_own_backlog() -> None:
    c = make_core(buffer_size=4, lease_batch=4)
    warm(c)
    payloads = [b"%d" % i for i in range(7)]
    (write,) = of(request(c, CLIENT, "SUBMIT", 0.1, rid=5, queue="q", payload=payloads), core.Write)
    (op,) = write.batch.submits
    assert op.owned == [True] * 7 and op.waiters == [2] + [None] * 6  # one sync matched
    subs = [Submitted(10 + i, True, True) for i in range(7)]
    actions = c.handle(Written(write.batch, WriteResult([subs], []), None, 0.2))
    assert [i for _, body in sent(actions, WORKER) for i in body["id"]] == [10]
    q = c.queues["q"]
    assert [t.id for t in q.buffer] == [11, 12, 13, 14] and list(q.backlog) == [[15, 16]]
    assert c.depths()["q"][0] == 6
    # a poll takes from the buffer; the buffer runs low, and the backlog is read back, no lease
    poll(c, now=0.3, rid=3, max=3)
    (read,) = of(c.handle(Tick(0.4)), core.Lease)
    assert read == core.Lease("q", 3, (15, 16))
    c.handle(Leased("q", [task(15)], None, 0.5, (15, 16)))  # 16 was cancelled meanwhile
    assert list(q.backlog) == [] and q.backlog_count == 0 and [t.id for t in q.buffer] == [14, 15]


def test_a_task_inserted_pending_stops_holding_until_the_shared_backlog_is_read_again() -> None:
    c = make_core()
    warm(c)
    (write,) = of(request(c, CLIENT, "SUBMIT", 0.1, rid=5, queue="q", payload=[b"x", b"y"]), core.Write)
    # the database found the lease ended: inserted pending, not held
    subs = [Submitted(3, True, False), Submitted(4, True, False)]
    actions = c.handle(Written(write.batch, WriteResult([subs], []), None, 0.2))
    assert sent(actions, WORKER) == []  # nothing to deliver: the poll waits on
    (write,) = of(request(c, CLIENT, "SUBMIT", 0.3, rid=6, queue="q", payload=[b"x"]), core.Write)
    assert write.batch.submits[0].owned == [False]  # older tasks wait in the database
    assert write.batch.submits[0].waiters == [None]  # and no sync match either


def test_an_own_backlog_nobody_polls_is_given_back_and_so_is_it_at_shutdown() -> None:
    c = make_core(buffer_size=2, lease_batch=2, idle_release=1.0)
    warm(c, timeout=0.05)
    submit_and_commit(c, 5, 0.03, 20)  # 20 to the poll, 21-22 buffered, 23-24 backlog
    (release,) = of(c.handle(Tick(5.0)), core.Write)
    assert release.batch.releases == [Ack(21, 1), Ack(22, 1)]
    assert release.batch.spans == [("q", 23, 24)]
    c = make_core(buffer_size=2, lease_batch=2)
    warm(c)
    submit_and_commit(c, 5, 0.03, 20)
    (last,) = of(c.handle(Shutdown(0.2)), core.Write)
    assert last.batch.spans == [("q", 23, 24)] and last.batch.releases == [Ack(21, 1), Ack(22, 1)]
    assert last.batch.starts == [Ack(1, 1), Ack(20, 1)]  # delivered: task leases, kept elsewhere


def test_a_sync_matched_task_is_never_inside_a_backlog_span() -> None:
    """Regression: a span grown past a task delivered by sync match read it back: it ran twice."""
    c = make_core(buffer_size=2, lease_batch=2)
    warm(c)
    submit_and_commit(c, 5, 0.03, 10)  # 10 to poll 2, 11-12 buffered, 13-14 the backlog
    assert list(c.queues["q"].backlog) == [[13, 14]]
    poll(c, 0.05, rid=3, max=1)  # served from the buffer
    poll(c, 0.06, rid=4, max=1)  # served from the buffer
    poll(c, 0.07, rid=5, max=1)  # waits (the backlog read is in flight)
    (key,) = c._waiters
    # a submit sync matched to it before the backlog existed, committed after it did
    op = SubmitOp(CLIENT, 6, [TaskSpec("q", b"m")], [key], [True])
    c._waiters[key].reserved = 1
    batch = WriteBatch(submits=[op])
    actions = c.handle(Written(batch, WriteResult([[Submitted(15, True, True)]], []), None, 0.08))
    assert [i for _, body in sent(actions, WORKER) for i in body["id"]] == [15]
    submit_and_commit(c, 1, 0.09, 16, rid=7)
    assert list(c.queues["q"].backlog) == [[13, 14], [16, 16]]


# -- operations --------------------------------------------------------------------------------


def workers(c: Core, now: float) -> dict[str, Any]:
    ((command, body),) = sent(request(c, CLIENT, "WORKERS", now, rid=77), CLIENT)
    assert command == "WORKER_LIST" and body["rid"] == 77 and body["broker"] == "b1"
    return body


def test_workers_lists_who_polls_what_holds_what_and_when_it_was_last_heard() -> None:
    c = make_core()
    assert workers(c, 0.0)["worker"] == []  # a client that only submits is no worker
    poll(c, max=3, queues=["q", "r"])
    c.handle(Leased("q", [task(1), task(2)], None, 0.1))  # delivered: the poll is answered
    body = workers(c, 0.5)
    assert (body["worker"], body["queues"], body["polls"], body["holding"]) == (
        ["w1"],
        [["q", "r"]],
        [0],
        [2],
    )
    assert body["peer"] == [WORKER.hex()] and body["heard"] == [0.5]
    poll(c, now=1.0, rid=2, queues=["q", "r"])  # waiting now
    request(c, WORKER, "COMPLETE", 2.0, rid=3, id=[1], attempt=[1])
    body = workers(c, 3.0)
    assert (body["polls"], body["holding"], body["heard"]) == ([1], [1], [1.0])
    request(c, b"other", "HEARTBEAT", 3.0, rid=4, id=[7, 8, 9], attempt=[1, 1, 1])  # failed over to us
    body = workers(c, 3.0)
    assert body["worker"] == [None, "w1"] and body["holding"] == [3, 1]  # known only by its heartbeats
    request(c, b"other", "HEARTBEAT", 3.5, rid=5, id=[7], attempt=[1], worker="w2")  # one that names it
    body = workers(c, 4.0)
    assert body["worker"] == ["w1", "w2"] and body["holding"] == [1, 1] and body["heard"] == [2.0, 0.5]
    assert body["running"] == [None, None]  # neither said how many of its tasks run
    request(c, b"other", "HEARTBEAT", 4.0, rid=6, id=[7, 8, 9], attempt=[1, 1, 1], worker="w2", running=1)
    assert workers(c, 4.0)["running"] == [None, 1]  # one runs, two are prefetched
    request(c, b"other", "COMPLETE", 4.5, rid=8, id=[7, 8, 9], attempt=[1, 1, 1])
    assert workers(c, 4.5)["running"] == [None, 0] and workers(c, 4.5)["holding"] == [1, 0]
    ((command, reply),) = sent(request(c, b"other", "HEARTBEAT", 4.0, rid=7, id=[7], attempt=[1], running=-1))
    assert (command, reply["code"]) == ("ERROR", "bad_request")
    c.handle(Tick(70.0))  # silent for a minute: forgotten
    assert workers(c, 70.0)["worker"] == []


def test_retry_goes_through_the_group_commit_and_is_acknowledged_after_it() -> None:
    c = make_core()
    (write,) = of(request(c, CLIENT, "RETRY", 0.0, rid=5, ids=[3, 4]), core.Write)
    assert [(op.kind, op.items) for op in write.batch.ops] == [("retry", [3, 4])]
    actions = c.handle(Written(write.batch, WriteResult([], [[Outcome.OK, Outcome.LIVE]]), None, 0.1))
    assert sent(actions, CLIENT) == [("ACK", {"rid": 5, "outcomes": ["ok", "live"]})]
