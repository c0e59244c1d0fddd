"""What a client or worker knows of the mesh: live brokers and their queue depths, from gossip.

Each broker publishes, every interval and at once on a big change, its endpoint and per queue
its buffered tasks and waiting polls. A broker not heard from for three of its intervals is
dropped. Peers learn gossip endpoints from configuration or by asking brokers (PING's `pub`),
and from the live peers each broker names (from the database) in its PONG and GOSSIP, so one
broker's endpoint is enough to join the whole mesh.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import zmq

from conduit.endpoints import check_endpoint
from conduit.errors import ConfigError
from conduit.wire import Command, ProtocolError, decode

STALE_AFTER = 3  # gossip intervals
SUSPECT_FOR = 10.0  # seconds a broker found gone is tried last, unless its gossip is heard again


@dataclass(frozen=True)
class BrokerView:
    broker: str
    endpoint: str
    queues: dict[str, list[int]]  # queue -> [buffered, polls waiting, delivered]
    interval: float
    seen: float
    stopping: bool

    def buffered(self, queues: list[str]) -> int:
        return sum(self.queues.get(q, [0, 0])[0] for q in queues)

    def polls(self, queues: list[str]) -> int:
        return sum(self.queues.get(q, [0, 0])[1] for q in queues)

    def delivered(self, queue: str) -> int:
        """Tasks handed to workers that the database holds as buffered until their first heartbeat."""
        counts = self.queues.get(queue, [])
        return counts[2] if len(counts) > 2 else 0


class Mesh:
    """A SUB socket on every known gossip endpoint and the table it feeds. One owner thread."""

    def __init__(self, ctx: zmq.Context[Any], endpoints: list[str], gossip: list[str] | None = None) -> None:
        self.endpoints = endpoints  # configured brokers: the fallback while no gossip is heard
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.subscribed: set[str] = set()
        self.brokers: dict[str, BrokerView] = {}
        self.suspects: dict[str, float] = {}  # endpoint -> when it was found gone
        for endpoint in gossip or []:
            self.subscribe(endpoint)

    def subscribe(self, endpoint: str) -> None:
        if endpoint and endpoint not in self.subscribed:
            self.sub.connect(endpoint)
            self.subscribed.add(endpoint)

    def learn(self, body: dict[str, Any]) -> None:
        """Subscribe to the gossip a PONG or GOSSIP body names: the broker's own and its peers'."""
        self.subscribe(str(body.get("pub") or ""))
        peers = body.get("peers")
        for peer in peers if isinstance(peers, list) else []:
            if isinstance(peer, dict) and isinstance(peer.get("pub"), str):
                try:
                    self.subscribe(check_endpoint(peer["pub"]))
                except (ConfigError, zmq.ZMQError):
                    continue  # a spelling ZeroMQ cannot use is a peer not heard of

    def update(self) -> None:
        """Take in all gossip waiting on the socket (non-blocking)."""
        now = time.monotonic()
        while True:
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                body = decode(frames, allowed=frozenset({Command.GOSSIP})).body
                view = BrokerView(
                    str(body["broker"]),
                    str(body["endpoint"]),
                    {str(q): _counts(d) for q, d in dict(body.get("queues", {})).items()},
                    float(body.get("interval", 1.0)),
                    now,
                    bool(body.get("stopping", False)),
                )
            except (ProtocolError, KeyError, TypeError, ValueError, IndexError):
                continue  # gossip that cannot be read is gossip not heard
            self.brokers[view.broker] = view
            if now - self.suspects.get(view.endpoint, now) >= view.interval:
                del self.suspects[view.endpoint]  # heard again, an interval after: it is back
            self.learn(body)  # brokers advertise their own gossip endpoint and their peers'
        for broker, view in list(self.brokers.items()):
            if now - view.seen > STALE_AFTER * view.interval:
                del self.brokers[broker]
        self.suspects = {e: t for e, t in self.suspects.items() if now - t < SUSPECT_FOR}

    def suspect(self, endpoint: str) -> None:
        """The broker there went quiet or dropped us: forget its gossip and try it last, until it
        is heard again (gossip older than the failure would still rank it first). Gossip it sent
        before, still queued here, is read now; what arrives within an interval proves nothing."""
        self.update()
        self.suspects[endpoint] = time.monotonic()
        self.brokers = {b: v for b, v in self.brokers.items() if v.endpoint != endpoint}

    def live(self) -> list[BrokerView]:
        return [v for v in self.brokers.values() if not v.stopping]

    def rank(self, queues: list[str], avoid: str | None = None) -> list[str]:
        """Endpoints to poll, best first: the deepest buffer for these queues; among brokers with
        nothing buffered, fewer waiting polls first (random among equals), so idle workers spread
        instead of piling on one broker; `avoid` (just polled empty) last among the empty ones.
        Brokers found gone lately come last of all."""
        live = self.live()
        shuffled = random.sample(live, len(live))
        ordered = sorted(shuffled, key=lambda v: (-v.buffered(queues), v.endpoint == avoid, v.polls(queues)))
        ranked = [v.endpoint for v in ordered]
        ranked += [e for e in self.endpoints if e not in ranked]
        return sorted(ranked, key=lambda e: e in self.suspects)  # stable: the order above holds

    def rank_for_submit(self, queues: list[str]) -> list[str]:
        """Endpoints to submit to, best first: brokers where workers poll or run these queues, at
        random among them (a task submitted there is held and handed out from memory, where
        elsewhere it waits in the database for a lease, one more write); then as `rank`."""
        wanted = {v.endpoint for v in self.live() if v.polls(queues) or any(v.delivered(q) for q in queues)}
        return sorted(self.rank([]), key=lambda e: e not in wanted)  # stable: random within each

    def close(self) -> None:
        self.sub.close(linger=0)


def _counts(raw: Any) -> list[int]:
    """[buffered, polls] and, from brokers that send it, delivered; more is ignored."""
    counts = [int(n) for n in list(raw)[:3]]
    if len(counts) < 2:
        raise ValueError(f"queue depths {raw!r} need at least two numbers")
    return counts
