"""Which workers a broker hears: for `conduit workers`, from what the protocol already carries.

A worker names itself in its POLLs (and may in HEARTBEATs), and may add its host, pid and
concurrency there; every HEARTBEAT lists the tasks it holds through this broker, and COMPLETE,
FAIL and RELEASE settle them. So a broker can say, per
worker connection, which queues it polls, what it holds and when it was last heard, with no
message added for it. Pure bookkeeping like the core that owns it: the time comes in with each
call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from conduit.wire import Poll

FORGET_AFTER = 60.0  # seconds of silence after which a worker is no longer shown


@dataclass
class Seen:
    worker: str | None = None  # None until it polls here (it may only heartbeat, after a failover)
    queues: tuple[str, ...] = ()
    holding: set[int] = field(default_factory=set)
    heard: float = 0.0
    host: str | None = None
    pid: int | None = None
    concurrency: int | None = None
    running: int | None = None  # of `holding`, those its last heartbeat said were running


@dataclass
class Peers:
    _seen: dict[bytes, Seen] = field(default_factory=dict)

    def heard(self, peer: bytes, now: float) -> Seen:
        seen = self._seen.get(peer)
        if seen is None:
            seen = self._seen[peer] = Seen()
        seen.heard = now
        return seen

    def polled(self, peer: bytes, poll: Poll, now: float) -> None:
        seen = self.heard(peer, now)
        seen.worker, seen.queues = poll.worker, poll.queues
        seen.host, seen.pid, seen.concurrency = poll.host, poll.pid, poll.concurrency

    def delivered(self, peer: bytes, ids: Iterable[int]) -> None:
        if peer in self._seen:
            self._seen[peer].holding.update(ids)

    def heartbeat(
        self,
        peer: bytes,
        ids: Iterable[int],
        now: float,
        worker: str | None = None,
        running: int | None = None,
    ) -> None:
        """A heartbeat lists everything the worker holds through us: it replaces what we knew.
        It may name the worker and say how many of them run (optional in the protocol; the
        reference workers do): the rest are prefetched."""
        seen = self.heard(peer, now)
        seen.holding = set(ids)
        seen.running = running
        if worker and seen.worker is None:
            seen.worker = worker[:200]

    def settled(self, peer: bytes, ids: Iterable[int], now: float) -> None:
        self.heard(peer, now).holding.difference_update(ids)

    def forget_silent(self, now: float) -> None:
        for peer in [p for p, s in self._seen.items() if now - s.heard > FORGET_AFTER]:
            del self._seen[peer]

    def body(self, rid: int, broker: str, polls: Counter[bytes], now: float) -> dict[str, Any]:
        """A WORKERS reply: one column per field, a row per worker connection heard lately."""
        rows = sorted(self._seen.items(), key=lambda item: (item[1].worker or "", item[0]))
        return {
            "rid": rid,
            "broker": broker,
            "worker": [s.worker for _, s in rows],
            "peer": [p.hex() for p, _ in rows],
            "queues": [list(s.queues) for _, s in rows],
            "polls": [polls[p] for p, _ in rows],
            "holding": [len(s.holding) for _, s in rows],
            "heard": [round(max(0.0, now - s.heard), 3) for _, s in rows],
            "host": [s.host for _, s in rows],
            "pid": [s.pid for _, s in rows],
            "concurrency": [s.concurrency for _, s in rows],
            # reports since the heartbeat took some of them away: they ran, so the rest still run
            "running": [None if s.running is None else min(s.running, len(s.holding)) for _, s in rows],
        }
