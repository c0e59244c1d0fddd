"""The Client's promises under a silent broker and under threads: an unkeyed submit that timed out
is not repeated elsewhere (it may have been carried out), a late reply is never taken for the
answer to a later request, and one Client serves many threads at once."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq
from test_e2e import running, wait_for
from test_mesh import Relay

from conduit.client import Client, TaskContext, Worker
from conduit.client.channel import BrokerTimeout
from conduit.task import TaskSpec
from conduit.wire import Command


@pytest.fixture
def relay_to(processes) -> Iterator:
    """Relays in front of brokers, closed after the test (before the brokers are killed)."""
    ctx = zmq.Context()
    relays: list[Relay] = []

    def make(broker) -> Relay:
        relays.append(Relay(ctx, broker.endpoint))
        return relays[-1]

    yield make
    for relay in relays:
        relay.close()
    ctx.term()


def test_an_unkeyed_submit_that_timed_out_is_not_retried_elsewhere(start_broker, relay_to, db) -> None:
    b1, b2 = start_broker(broker_id="b1"), start_broker(broker_id="b2")
    r1, r2 = relay_to(b1), relay_to(b2)
    with Client([r1.endpoint, r2.endpoint], retry_submits=False, timeout=5.0) as client:
        assert client.ping() == "b1"  # no gossip: the configured order
        b1.proc.send_signal(signal.SIGSTOP)  # it has the submit, but will not answer
        try:
            began = time.monotonic()
            with pytest.raises(BrokerTimeout, match="may or may not have been carried out"):
                client.submit("unkeyed", b"x")
            assert time.monotonic() - began < 5.0 + 1.0  # the request's timeout bounds it
        finally:
            b1.proc.send_signal(signal.SIGCONT)
        assert client.ping() in ("b1", "b2")  # usable afterwards
    assert [m for m in r2.requests if m.command is Command.SUBMIT] == []  # nothing sent to b2
    (submit,) = [m.rid for m in r1.requests if m.command is Command.SUBMIT]
    wait_for(lambda: submit in r1.replies, what="b1's late answer")
    late = r1.replies[submit]  # carried out after all, as the error warned it might be
    assert (late.command, late.body["created"]) == (Command.SUBMITTED, [True])
    assert db.query("SELECT id FROM tasks") == [(late.body["ids"][0],)]


def test_a_late_reply_is_not_taken_for_the_answer_to_the_next_request(start_broker, relay_to) -> None:
    broker = start_broker()
    relay = relay_to(broker)
    with Client(relay.endpoint, timeout=5.0) as client:
        first, second = client.submit_many([TaskSpec("idle", b"1"), TaskSpec("idle", b"2")])
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(BrokerTimeout):
                client.lookup([first])
            relay.hold()  # its answer, when it comes, goes to the connection of the next request
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        (asked,) = [m.rid for m in relay.requests if m.command is Command.RESULT]
        wait_for(lambda: asked in relay.replies, what="the late answer")
        for _ in range(3):
            assert [i.id for i in client.lookup([second])] == [second]
    assert asked in relay.handed_over  # the late answer did reach the client, ahead of the next


def test_one_client_used_from_many_threads_at_once(start_broker) -> None:
    broker = start_broker()
    worker = Worker(broker.endpoint, concurrency=8, poll_timeout=1.0)

    @worker.handler("echo")
    def echo(task: TaskContext) -> bytes:
        return task.payload[::-1]

    def work(client: Client, n: int, start: threading.Barrier) -> dict[int, tuple[bytes, bytes | None]]:
        """Submits one at a time and in batches, reads results and looks tasks up, interleaved."""
        start.wait()
        mine: dict[int, bytes] = {}
        for i in range(5):
            payloads = [b"%d-%d-%d" % (n, i, j) for j in range(4)]
            ids = [client.submit("echo", payloads[0])]
            ids += client.submit_many([TaskSpec("echo", p) for p in payloads[1:]])
            mine |= dict(zip(ids, payloads, strict=True))
            assert [t.id for t in client.lookup(ids)] == ids
        return {i: (p, client.result(i, timeout=30).result) for i, p in mine.items()}

    with Client(broker.endpoint) as client, running(worker):
        start = threading.Barrier(8)
        with ThreadPoolExecutor(8) as pool:
            done = list(pool.map(lambda n: work(client, n, start), range(8)))
    ids = [i for d in done for i in d]
    assert len(ids) == len(set(ids)) == 8 * 5 * 4
    assert all(result == payload[::-1] for d in done for payload, result in d.values())
