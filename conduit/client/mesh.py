"""What a client or worker knows of the mesh: live brokers and their queue depths, from gossip.

Each broker publishes, every interval and at once on a big change, its endpoint and per queue
its buffered tasks and waiting polls. A broker not heard from for three of its intervals is
dropped. Peers learn gossip endpoints from configuration or by asking brokers (PING's `pub`),
so a list of broker endpoints is enough to join.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import zmq

from conduit.wire import Command, ProtocolError, decode

STALE_AFTER = 3  # gossip intervals


@dataclass(frozen=True)
class BrokerView:
    broker: str
    endpoint: str
    queues: dict[str, list[int]]  # queue -> [buffered, polls waiting]
    interval: float
    seen: float
    stopping: bool

    def buffered(self, queues: list[str]) -> int:
        return sum(self.queues.get(q, [0, 0])[0] for q in queues)

    def polls(self, queues: list[str]) -> int:
        return sum(self.queues.get(q, [0, 0])[1] for q in queues)


class Mesh:
    """A SUB socket on every known gossip endpoint and the table it feeds. One owner thread."""

    def __init__(self, ctx: zmq.Context[Any], endpoints: list[str], gossip: list[str] | None = None) -> None:
        self.endpoints = endpoints  # configured brokers: the fallback while no gossip is heard
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.subscribed: set[str] = set()
        self.brokers: dict[str, BrokerView] = {}
        for endpoint in gossip or []:
            self.subscribe(endpoint)

    def subscribe(self, endpoint: str) -> None:
        if endpoint and endpoint not in self.subscribed:
            self.sub.connect(endpoint)
            self.subscribed.add(endpoint)

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
                    {str(q): [int(d[0]), int(d[1])] for q, d in dict(body.get("queues", {})).items()},
                    float(body.get("interval", 1.0)),
                    now,
                    bool(body.get("stopping", False)),
                )
            except (ProtocolError, KeyError, TypeError, ValueError, IndexError):
                continue  # gossip that cannot be read is gossip not heard
            self.brokers[view.broker] = view
            self.subscribe(str(body.get("pub") or ""))  # brokers advertise their own gossip endpoint
        for broker, view in list(self.brokers.items()):
            if now - view.seen > STALE_AFTER * view.interval:
                del self.brokers[broker]

    def live(self) -> list[BrokerView]:
        return [v for v in self.brokers.values() if not v.stopping]

    def rank(self, queues: list[str], avoid: str | None = None) -> list[str]:
        """Endpoints to poll, best first: the deepest buffer for these queues; among brokers with
        nothing buffered, fewer waiting polls first (random among equals), so idle workers spread
        instead of piling on one broker; `avoid` (just polled empty) last among the empty ones."""
        live = self.live()
        if not live:
            return list(self.endpoints)
        shuffled = random.sample(live, len(live))
        ordered = sorted(shuffled, key=lambda v: (-v.buffered(queues), v.endpoint == avoid, v.polls(queues)))
        ranked = [v.endpoint for v in ordered]
        return ranked + [e for e in self.endpoints if e not in ranked]

    def close(self) -> None:
        self.sub.close(linger=0)
