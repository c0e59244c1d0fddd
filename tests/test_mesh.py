"""Three brokers on one database: gossip, deepest-first polling, failover and lease takeover."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import zmq
from test_e2e import ledger_runs, running, spawn_worker, wait_for

from conduit.client import Client, TaskContext, Worker
from conduit.client.mesh import Mesh
from conduit.task import TaskSpec
from conduit.wire import REPLIES, Command, Message, decode


def mesh_of(start_broker, n: int, *extra: str) -> list:
    return [start_broker("--pub", "tcp://127.0.0.1:*", *extra, broker_id=f"b{i}") for i in range(1, n + 1)]


def test_workers_find_work_on_whichever_broker_has_it(start_broker, db) -> None:
    b1, b2, b3 = mesh_of(start_broker, 3)
    worker = Worker([b1.endpoint], concurrency=4, poll_timeout=1.0)  # knows only b1 at start
    done: list[str] = []

    @worker.handler("spread")
    def handle(task: TaskContext) -> bytes:
        done.append(task.broker)
        return task.broker.encode()

    with running(worker):
        for broker in (b2, b3):  # submits land on the other brokers
            with Client([broker.endpoint], retry_submits=False) as client:
                began = time.monotonic()
                ids = client.submit_many([TaskSpec("spread", b"") for _ in range(20)])
                assert all(client.result(i, timeout=30).state == "completed" for i in ids)
                assert time.monotonic() - began < 10
    assert len(done) == 40


def test_gossip_shows_the_mesh_and_a_late_broker_gets_polls(start_broker, db, processes) -> None:
    from conftest import free_port

    b1 = start_broker("--pub", "tcp://127.0.0.1:*", broker_id="b1")
    late_port, late_pub = free_port(), free_port()
    ctx = zmq.Context()
    mesh = Mesh(ctx, [b1.endpoint], [b1.pub, f"tcp://127.0.0.1:{late_pub}"])
    worker = Worker([b1.endpoint], gossip=[f"tcp://127.0.0.1:{late_pub}"], concurrency=1, poll_timeout=0.5)

    @worker.handler("idle")
    def handle(task: TaskContext) -> None:
        return None

    def polls_at(broker_id: str) -> int | None:
        mesh.update()
        view = mesh.brokers.get(broker_id)
        return view.polls(["idle"]) if view else None

    try:
        with running(worker):
            wait_for(lambda: polls_at("b1"), timeout=10, what="b1's gossip showing the poll")
            start_broker("--pub", f"tcp://127.0.0.1:{late_pub}", port=late_port, broker_id="late")
            wait_for(lambda: polls_at("late") is not None, timeout=10, what="the late broker's gossip")
            heard = time.monotonic()  # the worker can know of it from now (a process start-up ago)
            wait_for(lambda: polls_at("late"), timeout=10, what="a poll at the late broker")
            assert time.monotonic() - heard < 3.0  # its poll at b1 ends (0.5 s), a gossip interval or two
            assert {"b1", "late"} <= set(mesh.brokers)
    finally:
        mesh.close()
        ctx.term()


def test_broker_killed_with_tasks_buffered_and_in_flight_loses_none(
    start_broker, processes, db, tmp_path
) -> None:
    b1, b2, b3 = mesh_of(start_broker, 3)
    ledger = tmp_path / "ledger"
    # The worker starts on b1 (its first endpoint) and knows the others from gossip.
    spawn_worker(processes, f"{b1.endpoint} {b2.endpoint} {b3.endpoint}", ledger, concurrency=4)
    with Client([b2.endpoint, b3.endpoint], retry_submits=False) as client:
        ids = client.submit_many([TaskSpec("sleepy", b"0.05", lease_timeout=3.0) for _ in range(300)])
        wait_for(lambda: len(ledger_runs(ledger)) >= 30, what="work under way on b1")
        killed_at = time.monotonic()
        b1.kill()  # SIGKILL: its buffer and its deliveries are left behind
        for task_id in ids:
            assert client.result(task_id, timeout=60).state == "completed"
        took = time.monotonic() - killed_at
    assert took < 3.0 + 3.0 + 15  # broker lease + task lease + the rest of the work
    results = db.query("SELECT id, state FROM results")
    assert sorted(i for i, _ in results) == sorted(ids) and {s for _, s in results} == {"completed"}
    runs = Counter(t for t, _, _ in ledger_runs(ledger))
    assert set(runs) == set(ids) and max(runs.values()) <= 2


def test_worker_keeps_its_task_across_its_brokers_death(start_broker, processes, db, tmp_path: Path) -> None:
    b1, b2, _ = mesh_of(start_broker, 3)
    ledger = tmp_path / "ledger"
    spawn_worker(processes, f"{b1.endpoint} {b2.endpoint}", ledger, concurrency=1)
    with Client([b2.endpoint], retry_submits=False) as client:
        task_id = client.submit("sleepy", b"4.0", lease_timeout=3.0)
        wait_for(lambda: ledger_runs(ledger), what="the task to start")
        b1.kill()  # mid-task: heartbeats and the result must find another broker in time
        result = client.result(task_id, timeout=60)
    assert (result.state, result.attempt, result.result) == ("completed", 1, b"slept 1")
    assert [(t, a) for t, a, _ in ledger_runs(ledger)] == [(task_id, 1)]  # it ran once


def test_broker_that_cannot_hear_its_workers_loses_nothing(start_broker, processes, db, tmp_path) -> None:
    """The seed's corner case: a broker alive with a valid lease that its workers cannot reach
    (here: paused for less than its lease term). Workers fail over and keep their task leases
    through another broker; what it buffered stays its own and is served or given back after."""
    b1, b2 = mesh_of(start_broker, 2)
    ledger = tmp_path / "ledger"
    spawn_worker(processes, f"{b1.endpoint} {b2.endpoint}", ledger, concurrency=2)
    with Client([b2.endpoint], retry_submits=False) as client:
        long_id = client.submit("sleepy", b"3.0", lease_timeout=3.0)
        ids = client.submit_many([TaskSpec("sleepy", b"0.05", lease_timeout=3.0) for _ in range(100)])
        wait_for(lambda: len(ledger_runs(ledger)) >= 10, what="work under way")
        b1.proc.send_signal(signal.SIGSTOP)  # its lease (3 s term) outlives this pause
        time.sleep(2.0)
        b1.proc.send_signal(signal.SIGCONT)
        for task_id in [long_id, *ids]:
            assert client.result(task_id, timeout=60).state == "completed"
    results = db.query("SELECT id, state FROM results")
    assert sorted(i for i, _ in results) == sorted([long_id, *ids])
    runs = Counter(t for t, _, _ in ledger_runs(ledger))
    assert max(runs.values()) <= 2 and set(runs) == {long_id, *ids}


class Relay:
    """A ROUTER in front of one broker that passes requests to it over one DEALER and routes its
    replies back by rid, keeping a copy of each: a test sees what the broker answered, even to a
    client that gave up waiting. `hold()` makes it keep replies back until a request comes on
    another connection, and hand them to that one first: late replies where the next request waits."""

    def __init__(self, ctx: zmq.Context, broker: str) -> None:
        self.front = ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.bind("tcp://127.0.0.1:*")
        self.endpoint = self.front.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.back = ctx.socket(zmq.DEALER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.connect(broker)
        self.requests: list[Message] = []
        self.replies: dict[int, Message] = {}
        self.handed_over: list[int] = []  # rids of replies given to a connection other than theirs
        self._holding = threading.Event()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def hold(self) -> None:
        self._holding.set()

    def _run(self) -> None:
        peers: dict[int, bytes] = {}
        held: list[list[bytes]] = []
        last_peer = b""
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        try:
            while not self._halt.is_set():
                ready = dict(poller.poll(50))
                if self.front in ready:
                    peer, *frames = self.front.recv_multipart()
                    if self._holding.is_set() and peer != last_peer:
                        for late in held:
                            self.front.send_multipart([peer, *late])
                            self.handed_over.append(decode(late, allowed=REPLIES).rid)
                        held.clear()
                        self._holding.clear()
                    last_peer = peer
                    request = decode(frames)
                    self.requests.append(request)
                    peers[request.rid] = peer
                    self.back.send_multipart(frames)
                if self.back in ready:
                    frames = self.back.recv_multipart()
                    reply = decode(frames, allowed=REPLIES)
                    self.replies[reply.rid] = reply
                    if self._holding.is_set():
                        held.append(frames)
                    elif reply.rid in peers:  # to the connection that asked: dropped if it left
                        self.front.send_multipart([peers[reply.rid], *frames])
        finally:
            self.front.close()
            self.back.close()

    def close(self) -> None:
        self._halt.set()
        self._thread.join(10)


def test_a_submit_that_timed_out_is_retried_elsewhere_without_a_duplicate(start_broker, db) -> None:
    b1, b2 = start_broker(broker_id="b1"), start_broker(broker_id="b2")  # no gossip: tried in order
    ctx = zmq.Context()
    relay = Relay(ctx, b1.endpoint)
    try:
        with Client([relay.endpoint, b2.endpoint], timeout=2.0) as client:  # keys submits by default
            assert client.ping() == "b1"
            b1.proc.send_signal(signal.SIGSTOP)  # connected, but it will not answer in time
            try:
                ids = client.submit_many([TaskSpec("once", b"%d" % i) for i in range(5)])
            finally:
                b1.proc.send_signal(signal.SIGCONT)  # now it reads the submit it was sent, too
        sent = [m.rid for m in relay.requests if m.command is Command.SUBMIT]
        assert sent, "the submit never went to b1"
        wait_for(lambda: all(rid in relay.replies for rid in sent), timeout=15, what="b1's late answers")
        for rid in sent:  # b1 did process it: the same tasks back, none created
            late = relay.replies[rid]
            assert late.command is Command.SUBMITTED, late.body
            assert (late.body["ids"], late.body["created"]) == (ids, [False] * 5)
    finally:
        relay.close()
        ctx.term()
    assert db.query("SELECT count(*) FROM tasks WHERE queue = 'once'") == [(5,)]
    assert sorted(i for (i,) in db.query("SELECT id FROM tasks")) == sorted(ids)
