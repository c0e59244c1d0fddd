"""What `conduit top` and the dashboard show, gathered in one place so both read the same source.

Three sources, each the cheapest that is exact: the database's counters (`queue_stats`, never a
COUNT over the backlog), its brokers table (epochs and leases) and paused queues; and the live
brokers themselves over ZeroMQ, for what only their memory holds: buffered tasks (gossip) and the
workers they heard (`WORKERS`). Rates are counter deltas between two readings, so they cost no
query of their own. A source that fails is named in `Frame.problems`; the others still show.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from conduit.client.client import Client, WorkerSeen
from conduit.errors import ConduitError, DatabaseError
from conduit.store import Store
from conduit.store.ops import BrokerRow
from conduit.task import FINAL_STATES, STATES

HISTORY_SECONDS = 15 * 60  # how far back the rate series (the dashboard's charts) reach


@dataclass(frozen=True)
class Percentiles:
    p50: float  # seconds
    p99: float


def start_latency(client: Client | None) -> dict[str, Percentiles]:
    """Start latency per queue over the last minute (`run_at` to delivery), as the brokers measure
    it and answer `STATS` (docs/METRICS.md). With several brokers, the slowest one's figures: each
    gives percentiles of its own deliveries, which do not add up. A queue no broker delivered in
    the last minute, or no broker answering, has none, and every view shows "-"."""
    if client is None:
        return {}
    try:
        stats = client.stats(timeout=0.5)
    except ConduitError:
        return {}
    found: dict[str, Percentiles] = {}
    for broker in stats:
        for name, q in broker.queues.items():
            if q.latency_p50 is None or q.latency_p99 is None:
                continue
            got = found.get(name)
            p50, p99 = (
                (max(got.p50, q.latency_p50), max(got.p99, q.latency_p99))
                if got
                else (q.latency_p50, q.latency_p99)
            )
            found[name] = Percentiles(p50, p99)
    return found


@dataclass(frozen=True)
class QueueRow:
    name: str
    counts: dict[str, int]  # by state, from the counters
    paused: bool
    rate_in: float | None  # tasks/s submitted since the reading before; None at the first
    rate_out: float | None  # tasks/s finished (completed, dead or cancelled)
    latency: Percentiles | None

    @property
    def depth(self) -> int:
        """Tasks not finished yet: pending, buffered and running."""
        return sum(n for state, n in self.counts.items() if state not in FINAL_STATES)


@dataclass(frozen=True)
class BrokerStatus:
    row: BrokerRow
    gossip: dict[str, list[int]] | None  # queue -> [buffered, polls, delivered]; None: not heard

    @property
    def buffered(self) -> int | None:
        return None if self.gossip is None else sum(c[0] for c in self.gossip.values())

    @property
    def polls(self) -> int | None:
        """Waiting polls summed over queues: a poll for two queues counts in both."""
        return None if self.gossip is None else sum(c[1] for c in self.gossip.values() if len(c) > 1)


@dataclass(frozen=True)
class Frame:
    taken_at: datetime
    queues: list[QueueRow]
    brokers: list[BrokerStatus]
    workers: list[WorkerSeen]
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at.isoformat(),
            "queues": [
                {
                    "queue": q.name,
                    "counts": {s: q.counts.get(s, 0) for s in STATES},
                    "depth": q.depth,
                    "paused": q.paused,
                    "rate_in": q.rate_in,
                    "rate_out": q.rate_out,
                    "start_latency_p50": q.latency.p50 if q.latency else None,
                    "start_latency_p99": q.latency.p99 if q.latency else None,
                }
                for q in self.queues
            ],
            "brokers": [
                {
                    "broker": b.row.broker,
                    "epoch": b.row.epoch,
                    "endpoint": b.row.endpoint,
                    "lease": "live" if b.row.live else "expired",
                    "lease_left": round(b.row.lease_left, 3),
                    "started_at": b.row.started_at.isoformat(),
                    "buffered": b.buffered,
                    "polls": b.polls,
                }
                for b in self.brokers
            ],
            "workers": [w.as_dict() for w in self.workers],
            "problems": self.problems,
        }


class Rates:
    """Per-queue rates in and out from successive counter readings, kept for HISTORY_SECONDS."""

    def __init__(self, keep: float = HISTORY_SECONDS) -> None:
        self.keep = keep
        self.readings: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()

    def add(self, now: float, stats: dict[str, dict[str, int]]) -> None:
        totals = {
            queue: (sum(counts.values()), sum(counts.get(s, 0) for s in FINAL_STATES))
            for queue, counts in stats.items()
        }
        self.readings.append((now, totals))
        while self.readings and self.readings[0][0] < now - self.keep:
            self.readings.popleft()

    def last(self, queue: str) -> tuple[float, float] | None:
        """Tasks/s in and out between the last two readings; None before there are two."""
        series = self.series(queue, points=1)
        return series[-1][1:] if series else None

    def series(self, queue: str, points: int | None = None) -> list[tuple[float, float, float]]:
        """(time, in/s, out/s) between consecutive readings, oldest first. A counter that went
        down (finished days pruned) counts as no change."""
        readings = list(self.readings)[-(points + 1) :] if points else list(self.readings)
        out = []
        for (t0, a), (t1, b) in itertools.pairwise(readings):
            before, after = a.get(queue, (0, 0)), b.get(queue, (0, 0))
            dt = max(t1 - t0, 1e-6)
            out.append((t1, max(0, after[0] - before[0]) / dt, max(0, after[1] - before[1]) / dt))
        return out


class Observer:
    """Reads frames from the database and the live brokers. Thread-safe (a dashboard's
    requests and its sampler share it); reconnects to the database after an outage."""

    def __init__(self, dsn: str, schema: str, connect: Sequence[str] = (), timeout: float = 0.5) -> None:
        self.dsn, self.schema = dsn, schema
        self.connect = list(connect)  # brokers to ask; none: the live ones in the brokers table
        self.timeout = timeout
        self.rates = Rates()
        self.latency: deque[tuple[float, dict[str, Percentiles]]] = deque()  # readings with a figure
        self._lock = threading.RLock()  # the connections: held across a query
        self._history = threading.Lock()  # the readings: never held across I/O (an event loop reads them)
        self._store: Store | None = None
        self._client: Client | None = None
        self._client_for: list[str] = []

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
            if self._client is not None:
                self._client.close()
                self._client = None

    def run(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Call a Store operation (`list_tasks`, `retry`, ...) under the lock; a lost connection
        becomes a one-line DatabaseError and the next call reconnects."""
        with self._lock:
            if self._store is None:
                self._store = Store.open(self.dsn, schema=self.schema)
            try:
                return getattr(self._store, operation)(*args, **kwargs)
            except psycopg.Error as exc:
                self._store.close()
                self._store = None
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DatabaseError(f"database: {reason}") from None

    def queues(self, sample: bool = True) -> list[QueueRow]:
        """Every queue the counters know, with the rates between the last two readings; with
        `sample` this reading is one of them (else, as a dashboard page does, it leaves the
        series to its sampler's regular readings)."""
        with self._lock:
            stats = self.run("queue_stats")
            paused = self.run("paused")
            if self._client is None:  # a dashboard page may read queues before any mesh view
                self._live_brokers()
            latency = start_latency(self._client)
            with self._history:
                if sample:
                    now = time.monotonic()
                    self.rates.add(now, stats)
                    if latency:
                        self.latency.append((now, latency))
                    while self.latency and self.latency[0][0] < now - HISTORY_SECONDS:
                        self.latency.popleft()
                last = {name: self.rates.last(name) for name in stats}
            rows = []
            for name in sorted({*stats, *paused}):
                rate = last.get(name)
                rows.append(
                    QueueRow(
                        name,
                        stats.get(name, {}),
                        name in paused,
                        rate[0] if rate else None,
                        rate[1] if rate else None,
                        latency.get(name),
                    )
                )
            return rows

    def rate_series(self, queue: str) -> list[tuple[float, float, float]]:
        """(time, in/s, out/s) of the queue between the readings kept (the sampler adds them)."""
        with self._history:
            return self.rates.series(queue)

    def latency_series(self, queue: str) -> list[tuple[float, float, float]]:
        """(time, p50, p99) of the queue's start latency at each reading that had one."""
        with self._history:
            return [(t, got[queue].p50, got[queue].p99) for t, got in self.latency if queue in got]

    def mesh(self) -> tuple[list[BrokerStatus], list[WorkerSeen], list[str]]:
        """Brokers (the table's leases, and the gossip of those that publish it), the workers the
        live ones heard, and what could not be read."""
        problems: list[str] = []
        with self._lock:
            rows, client = self._live_brokers()
            workers: list[WorkerSeen] = []
            gossip: dict[str, dict[str, list[int]]] = {}
            if client is not None:
                try:
                    workers = client.workers(self.timeout)
                except ConduitError as exc:
                    problems.append(f"brokers: {exc}")
                gossip = {v.broker: v.queues for v in client.brokers()}
            elif not self.connect:
                problems.append("no live broker in the database")
        brokers = [BrokerStatus(r, gossip.get(r.broker) if r.live else None) for r in rows]
        return brokers, workers, problems

    def frame(self) -> Frame:
        """One reading of everything; a database failure raises (there is nothing to show)."""
        brokers, workers, problems = self.mesh()
        queues = self.queues()
        return Frame(datetime.now(UTC), queues, brokers, workers, problems)

    def _live_brokers(self) -> tuple[list[BrokerRow], Client | None]:
        """The brokers table, and a Client on the live brokers (or on --connect's)."""
        rows: list[BrokerRow] = self.run("brokers")
        asked = self.connect or list(dict.fromkeys(r.endpoint for r in rows if r.live))
        return rows, self._client_of(asked)

    def _client_of(self, endpoints: list[str]) -> Client | None:
        """A Client on these brokers, made again when the set changes (a broker came or went)."""
        if sorted(endpoints) != self._client_for:
            if self._client is not None:
                self._client.close()
            self._client = Client(endpoints, timeout=self.timeout) if endpoints else None
            self._client_for = sorted(endpoints)
            if self._client is not None:
                with contextlib.suppress(ConduitError):
                    self._client.ping()  # a first answer makes it ask for the brokers' gossip
        return self._client
