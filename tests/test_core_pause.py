"""Paused queues in the broker's sans-IO core: what it stops matching, what it gives back, how it
learns of a pause and what it keeps when it cannot. No sockets, no database, no clock."""

from __future__ import annotations

from test_core import CLIENT, WORKER, drain, empty, make_core, of, poll, request, sent, task, warm

from conduit.broker import core
from conduit.broker.events import Leased, Notified, PausedRead, PauseSet, Shutdown, Tick, Written
from conduit.broker.pauses import PAUSED_NOTICE
from conduit.broker.writes import WriteResult
from conduit.task import Ack, Submitted

PAUSED = frozenset({"q"})


def test_a_paused_queue_is_not_sync_matched_held_or_announced() -> None:
    c = make_core()
    drain(c)  # a poll waits on a drained queue: a submit would go straight to it
    c.handle(PausedRead(PAUSED, 0.05))
    (write,) = of(request(c, CLIENT, "SUBMIT", 0.1, rid=7, queue="q", payload=[b"x"]), core.Write)
    (op,) = write.batch.submits
    assert (op.waiters, op.owned) == ([None], [False])  # inserted pending, for after the resume
    assert write.batch.notify == []  # no broker may take it: none is woken
    actions = c.handle(Written(write.batch, WriteResult([[Submitted(5, True, False)]], []), None, 0.2))
    assert sent(actions, CLIENT) == [("SUBMITTED", {"rid": 7, "ids": [5], "created": [True]})]
    assert sent(actions, WORKER) == [] and not of(actions, core.Lease)  # nothing read for the poll
    assert not of(c.handle(Tick(1.0)), core.Lease)
    assert sent(c.handle(Tick(10.0)), WORKER) == [("DELIVER", empty(1))]  # it times out as usual


def test_a_poll_of_a_paused_and_a_running_queue_gets_only_the_running_one() -> None:
    c = make_core()
    c.handle(PausedRead(PAUSED, 0.0))
    actions = poll(c, max=5, queues=["q", "r"])
    assert of(actions, core.Lease) == [core.Lease("r", 500)]  # the paused queue is not read
    actions = c.handle(Leased("r", [task(1, "r"), task(2, "r")], None, 0.1))
    ((command, body),) = sent(actions, WORKER)
    assert command == "DELIVER" and body["id"] == [1, 2] and body["queue"] == ["r", "r"]
    # a submit to the running queue is matched to the mixed poll; one to the paused queue is not
    poll(c, 0.2, rid=2, queues=["q", "r"])
    both = request(c, CLIENT, "SUBMIT", 0.3, rid=8, queue=["q", "r"], payload=[b"a", b"b"])
    (op,) = of(both, core.Write)[0].batch.submits
    assert op.waiters == [None, 2] and op.owned == [False, True]


def test_a_pause_gives_back_what_the_broker_holds_and_a_read_in_flight() -> None:
    c = make_core(buffer_size=2, lease_batch=2)
    warm(c)
    (write,) = of(
        request(c, CLIENT, "SUBMIT", 0.1, rid=5, queue="q", payload=[b"%d" % i for i in range(5)]), core.Write
    )
    subs = [Submitted(20 + i, True, True) for i in range(5)]
    c.handle(Written(write.batch, WriteResult([subs], []), None, 0.11))  # 20 to the poll, 21-22, 23-24
    assert [t.id for t in c.queues["q"].buffer] == [21, 22] and list(c.queues["q"].backlog) == [[23, 24]]
    actions = c.handle(PausedRead(PAUSED, 0.2))
    (release,) = of(actions, core.Write)
    assert release.batch.releases == [Ack(21, 1), Ack(22, 1)] and release.batch.spans == [("q", 23, 24)]
    assert c.depths()["q"][0] == 0 and of(actions, core.Log)[0].event == "queue_paused"
    # the next poll asks for q: nothing is delivered from it, and nothing is read for it
    assert sent(poll(c, 0.3, rid=3), WORKER) == [] and not of(c.handle(Tick(0.4)), core.Lease)
    # a read in flight when the pause arrives: what it brings is given back, not delivered
    c = make_core()
    poll(c, max=1)
    c.handle(PausedRead(PAUSED, 0.01))
    actions = c.handle(Leased("q", [task(7, attempt=3)], None, 0.02))
    assert sent(actions, WORKER) == [] and of(actions, core.Write)[0].batch.releases == [Ack(7, 3)]


def test_a_submit_matched_before_the_pause_and_committed_after_it_is_not_delivered() -> None:
    c = make_core()
    drain(c)
    (write,) = of(request(c, CLIENT, "SUBMIT", 0.1, rid=7, queue="q", payload=[b"x", b"y"]), core.Write)
    assert write.batch.submits[0].waiters == [1, None]
    c.handle(PausedRead(PAUSED, 0.15))
    result = WriteResult([[Submitted(42, True, True), Submitted(43, True, True)]], [])
    actions = c.handle(Written(write.batch, result, None, 0.2))
    assert sent(actions, CLIENT) == [("SUBMITTED", {"rid": 7, "ids": [42, 43], "created": [True, True]})]
    assert sent(actions, WORKER) == []  # the poll waits on, free again
    assert sorted(of(actions, core.Write)[0].batch.releases) == [Ack(42, 1), Ack(43, 1)]
    assert 1 in c._waiters and not c._waiters[1].reserved


def test_a_resumed_queue_is_read_at_once_for_its_waiting_polls() -> None:
    c = make_core()
    c.handle(PausedRead(PAUSED, 0.0))
    poll(c, max=3)
    actions = c.handle(PausedRead(frozenset(), 0.5))
    assert (
        of(actions, core.Lease) == [core.Lease("q", 500)]
        and of(actions, core.Log)[0].event == "queue_resumed"
    )
    actions = c.handle(Leased("q", [task(1), task(2)], None, 0.6))
    ((command, body),) = sent(actions, WORKER)
    assert command == "DELIVER" and body["id"] == [1, 2]


def test_the_set_is_read_every_second_at_once_on_a_notice_and_kept_when_a_read_fails() -> None:
    c = make_core()
    assert of(c.handle(Tick(0.0)), core.ReadPaused) == [core.ReadPaused()]
    assert not of(c.handle(Tick(0.5)), core.ReadPaused)  # in flight: one at a time
    c.handle(PausedRead(PAUSED, 0.6))
    assert not of(c.handle(Tick(0.7)), core.ReadPaused)
    assert of(c.handle(Tick(1.0)), core.ReadPaused)  # a second after the last one began
    c.handle(PausedRead(None, 1.1))  # the database is down: the last set known stays
    assert c.pauses.queues == PAUSED and c.queues["q"].paused
    assert of(c.handle(Notified(PAUSED_NOTICE, 1.2)), core.ReadPaused)  # heard: read at once
    # a notice while a read is in flight: that read may predate the change, so read once more
    assert not of(c.handle(Notified(PAUSED_NOTICE, 1.3)), core.ReadPaused)
    assert of(c.handle(PausedRead(PAUSED, 1.4)), core.ReadPaused)
    assert "!paused" not in c.queues  # the notice is no queue


def test_pause_and_resume_requests_run_on_the_database_and_answer_whether_they_changed() -> None:
    c = make_core()
    actions = request(c, CLIENT, "PAUSE", rid=3, queue="q")
    assert of(actions, core.SetPaused) == [core.SetPaused(CLIENT, 3, "q", True)] and sent(actions) == []
    assert of(request(c, CLIENT, "RESUME", rid=4, queue="q"), core.SetPaused) == [
        core.SetPaused(CLIENT, 4, "q", False)
    ]
    actions = c.handle(PauseSet(CLIENT, 3, True, PAUSED, None, 0.1))
    assert sent(actions) == [("ACK", {"rid": 3, "outcomes": ["ok"]})] and c.queues["q"].paused
    actions = c.handle(PauseSet(CLIENT, 5, False, PAUSED, None, 0.2))
    assert sent(actions) == [("ACK", {"rid": 5, "outcomes": ["unchanged"]})]
    ((command, body),) = sent(c.handle(PauseSet(CLIENT, 6, False, None, "OperationalError: down", 0.3)))
    assert (command, body["code"], body["rid"]) == ("ERROR", "unavailable", 6) and c.pauses.queues == PAUSED
    ((command, body),) = sent(request(c, CLIENT, "PAUSE", rid=7, queue="bad name"))
    assert (command, body["code"]) == ("ERROR", "invalid_task")
    c.handle(Shutdown(0.4))
    ((command, body),) = sent(request(c, CLIENT, "RESUME", 0.5, rid=8, queue="q"))
    assert (command, body["code"]) == ("ERROR", "shutting_down")
