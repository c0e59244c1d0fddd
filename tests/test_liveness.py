"""Nobody waits long on a broker that stops, pauses or dies (docs/PROTOCOL.md §11): a stopping
broker says so at once and answers every request until it exits; peers give a quiet broker up
after two liveness intervals and move."""

from __future__ import annotations

import signal
import time

import zmq
from test_e2e import polls_waiting, running, wait_for

from conduit.client import BrokerError, BrokerTimeout, Client, TaskContext, Worker
from conduit.client.channel import Channel
from conduit.client.mesh import Mesh
from conduit.wire import Command


def test_a_stopping_broker_says_so_and_answers_every_request_until_it_exits(start_broker) -> None:
    broker = start_broker("--pub", "tcp://127.0.0.1:0")
    ctx = zmq.Context()
    mesh = Mesh(ctx, [], [broker.pub])
    channel = Channel(ctx, broker.endpoint)
    try:
        wait_for(lambda: mesh.update() or mesh.brokers, what="the broker's gossip")
        broker.proc.send_signal(signal.SIGTERM)
        outcomes: list[tuple[str, float]] = []
        requests = [
            (Command.PING, {}),
            (Command.SUBMIT, {"queue": "q", "payload": [b""]}),
            (Command.RESULT, {"ids": [1]}),
            (Command.HEARTBEAT, {"id": [1], "attempt": [1]}),
        ]
        while broker.proc.poll() is None and len(outcomes) < 1000:
            command, body = requests[len(outcomes) % len(requests)]
            sent = time.monotonic()
            try:
                channel.request(command, body, timeout=10.0)
                outcome = "answered"
            except BrokerError as exc:
                outcome = exc.code
            except BrokerTimeout as exc:  # gone: its connection dropped as it exited
                outcome = str(exc)
            outcomes.append((outcome, time.monotonic() - sent))
        broker.proc.wait(10)
        mesh.update()
        (view,) = mesh.brokers.values()
    finally:
        channel.close()
        mesh.close()
        ctx.term()
    assert view.stopping, "no GOSSIP with stopping: true was heard before the broker exited"
    slow = [(o, round(s, 2)) for o, s in outcomes if s > 1.0]
    assert not slow, f"requests left waiting during the stop: {slow}"
    assert "shutting_down" in {o for o, _ in outcomes}  # it answered while it lingered


def test_an_idle_workers_poll_moves_at_once_from_a_stopping_broker(start_broker) -> None:
    stopping = start_broker("--pub", "tcp://127.0.0.1:0", broker_id="stopping")
    other = start_broker(broker_id="other")
    worker = Worker([stopping.endpoint, other.endpoint], concurrency=1, poll_timeout=5.0)
    started: list[float] = []

    @worker.handler("moved")
    def moved(task: TaskContext) -> bytes:
        started.append(time.monotonic())
        return b""

    with running(worker), Client([other.endpoint]) as client:
        polls_waiting(stopping.pub, "moved", 1)  # its first poll waits at its first endpoint
        stopped_at = time.monotonic()
        stopping.proc.send_signal(signal.SIGTERM)
        client.submit("moved", b"")
        wait_for(lambda: started, timeout=10, what="the task on the other broker")
    # Its poll is answered empty at once, the next gets shutting_down (or finds the broker gone):
    # it moves, pauses 0.1 s and polls the other broker, well before its 5 s poll would end.
    assert started[0] - stopped_at < 1.5


def test_a_submit_to_a_killed_broker_goes_elsewhere_at_once(start_broker) -> None:
    """A killed broker's connection drops: nothing waits out the liveness bound for it."""
    dead, live = start_broker(broker_id="dead"), start_broker(broker_id="live")
    with Client([dead.endpoint, live.endpoint]) as client:  # no gossip: tried in this order
        assert client.ping() == "dead"
        dead.kill()
        time.sleep(0.2)  # ZeroMQ sees the connection drop and its reconnects refused
        began = time.monotonic()
        client.submit("anywhere", b"")
        took = time.monotonic() - began
        began = time.monotonic()
        client.submit("anywhere", b"")  # the dead one is now tried last
        again = time.monotonic() - began
    assert took < 1.0, f"the first submit after the kill took {took:.2f} s"
    assert again < 0.5, f"the next submit took {again:.2f} s"
