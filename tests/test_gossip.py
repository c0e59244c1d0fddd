"""What a worker or client makes of gossip (conduit/client/mesh.py), fed by real PUB sockets with
GOSSIP messages as brokers send them: deepest buffer first, then fewest waiting polls (random
among equals, the broker just polled empty last), and a broker unheard for three of its own
intervals dropped."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from conduit.client.mesh import Mesh
from conduit.wire import PROTOCOL, Command, encode

CONFIGURED = "tcp://127.0.0.1:1"  # given to the mesh but never gossiped about


class Broker:
    """One broker's gossip: a PUB socket and the body it publishes."""

    def __init__(self, ctx: zmq.Context, name: str, queues: dict[str, list[int]], **body: Any) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.pub = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.endpoint = f"tcp://{name}.example:5555"
        self.body = {"broker": name, "endpoint": self.endpoint, "pub": self.pub, "interval": 0.5}
        self.body |= {"seq": 0, "stopping": False, "queues": queues, **body}

    def say(self) -> None:
        self.body["seq"] += 1
        self.sock.send_multipart(encode(Command.GOSSIP, self.body))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def hear(
    mesh: Mesh, brokers: list[Broker], until: Callable[[], bool], also: Callable[[], None] = lambda: None
) -> None:
    """Publish until the mesh has heard enough: a SUB misses what came before it joined."""
    deadline = time.monotonic() + 10
    while not until():
        assert time.monotonic() < deadline, f"the mesh heard only {sorted(mesh.brokers)}"
        for broker in brokers:
            broker.say()
        also()
        time.sleep(0.02)
        mesh.update()


def test_deepest_buffer_first_then_fewest_polls_random_among_equals(ctx) -> None:
    brokers = {
        "shallow": Broker(ctx, "shallow", {"q": [5, 3]}),
        "deep": Broker(ctx, "deep", {"q": [20, 9]}),
        "busy": Broker(ctx, "busy", {"q": [0, 2]}),
        "idle": Broker(ctx, "idle", {}),
        "other": Broker(ctx, "other", {"r": [100, 0]}),  # deep, but for another queue
        "leaving": Broker(ctx, "leaving", {"q": [50, 0]}, stopping=True),
    }
    e = {name: b.endpoint for name, b in brokers.items()}
    mesh = Mesh(ctx, [CONFIGURED, e["busy"]], [b.pub for b in brokers.values()])  # busy: listed once
    junk = ctx.socket(zmq.PUB)  # gossip that cannot be read is not heard, and harms nothing
    junk.setsockopt(zmq.LINGER, 0)
    junk.bind("tcp://127.0.0.1:*")
    mesh.subscribe(junk.getsockopt(zmq.LAST_ENDPOINT).decode())

    def garbage() -> None:
        junk.send_multipart([PROTOCOL, b"GOSSIP", b"\xc1"])
        junk.send_multipart(encode(Command.GOSSIP, {"endpoint": "tcp://nameless:1", "queues": {}}))

    try:
        hear(mesh, list(brokers.values()), lambda: len(mesh.brokers) == 6, garbage)
        assert set(mesh.brokers) == set(brokers)
        assert {v.broker for v in mesh.live()} == set(brokers) - {"leaving"}  # stopping: not polled
        orders = {tuple(mesh.rank(["q"])) for _ in range(200)}
        # Deepest first; of the empty, fewest polls first, the two without any in either order
        # (idle workers spread); the configured broker nobody gossips about, last.
        assert orders == {
            (e["deep"], e["shallow"], e["idle"], e["other"], e["busy"], CONFIGURED),
            (e["deep"], e["shallow"], e["other"], e["idle"], e["busy"], CONFIGURED),
        }
        # The broker just polled empty goes last of the empty ones, but a deep one stays first.
        assert mesh.rank(["q"], avoid=e["idle"]) == [
            e["deep"],
            e["shallow"],
            e["other"],
            e["busy"],
            e["idle"],
            CONFIGURED,
        ]
        assert mesh.rank(["q"], avoid=e["deep"])[:2] == [e["deep"], e["shallow"]]
        assert mesh.rank(["q", "r"])[:3] == [e["other"], e["deep"], e["shallow"]]  # summed over queues
    finally:
        for broker in brokers.values():
            broker.close()
        junk.close()
        mesh.close()


def test_a_broker_unheard_for_three_of_its_intervals_is_dropped(ctx) -> None:
    slow = Broker(ctx, "slow", {"q": [1, 0]}, interval=1.0)
    fast = Broker(ctx, "fast", {"q": [1, 0]}, interval=0.2)
    mesh = Mesh(ctx, [CONFIGURED], [slow.pub, fast.pub])
    try:
        hear(mesh, [slow, fast], lambda: {"slow", "fast"} <= set(mesh.brokers))
        time.sleep(0.1)  # both fall silent; take in what is still on its way
        mesh.update()
        seen = {name: view.seen for name, view in mesh.brokers.items()}

        def heard_after(delay: float) -> set[str]:
            time.sleep(max(0.0, min(seen.values()) + delay - time.monotonic()))
            mesh.update()
            return set(mesh.brokers)

        assert heard_after(0.8) == {"slow"}  # fast: 4 of its intervals; slow: under 1 of its own
        assert heard_after(2.0) == {"slow"}  # two of its intervals: not yet
        assert heard_after(3.3) == set()
        assert mesh.rank(["q"]) == [CONFIGURED]  # with nobody live, the configured list
        hear(mesh, [slow], lambda: "slow" in mesh.brokers)  # heard again: back
    finally:
        slow.close()
        fast.close()
        mesh.close()


def test_a_broker_found_gone_is_tried_last_though_its_old_gossip_is_still_queued(ctx) -> None:
    gone = Broker(ctx, "gone", {"q": [50, 0]})  # the deepest, so first, until it goes quiet
    other = Broker(ctx, "other", {"q": [1, 0]})
    mesh = Mesh(ctx, [], [gone.pub, other.pub])
    try:
        hear(mesh, [gone, other], lambda: {"gone", "other"} <= set(mesh.brokers))
        assert mesh.rank(["q"])[0] == gone.endpoint
        gone.say()  # sent before it died, read only after the peer found it gone
        time.sleep(0.05)
        mesh.suspect(gone.endpoint)
        mesh.update()
        assert mesh.rank(["q"])[0] == other.endpoint and gone.endpoint in mesh.suspects
        time.sleep(gone.body["interval"])
        hear(mesh, [gone], lambda: gone.endpoint not in mesh.suspects)  # heard anew: back
        assert mesh.rank(["q"])[0] == gone.endpoint
    finally:
        gone.close()
        other.close()
        mesh.close()


def test_a_submit_goes_first_where_workers_poll_or_run_its_queue(ctx) -> None:
    """There it is held and handed out from memory; elsewhere it would wait for a lease."""
    brokers = {
        "polled": Broker(ctx, "polled", {"q": [0, 2, 0]}),
        "running": Broker(ctx, "running", {"q": [0, 0, 40]}),
        "deep": Broker(ctx, "deep", {"q": [300, 0, 0]}),  # a backlog, but nobody takes from it
        "elsewhere": Broker(ctx, "elsewhere", {"r": [0, 5, 9]}),
    }
    e = {name: b.endpoint for name, b in brokers.items()}
    mesh = Mesh(ctx, [CONFIGURED], [b.pub for b in brokers.values()])
    try:
        hear(mesh, list(brokers.values()), lambda: len(mesh.brokers) == 4)
        firsts = {tuple(mesh.rank_for_submit(["q"])[:2]) for _ in range(100)}
        assert firsts == {(e["polled"], e["running"]), (e["running"], e["polled"])}
        assert mesh.rank_for_submit(["q"])[-1] == CONFIGURED
        assert mesh.rank_for_submit(["r"])[0] == e["elsewhere"]
        assert set(mesh.rank_for_submit(["q", "r"])[:3]) == {e["polled"], e["running"], e["elsewhere"]}
        mesh.suspect(e["polled"])  # found gone: its gossip is forgotten until heard again
        assert mesh.rank_for_submit(["q"])[0] == e["running"]
        assert e["polled"] not in mesh.rank_for_submit(["q"])
    finally:
        for broker in brokers.values():
            broker.close()
        mesh.close()
