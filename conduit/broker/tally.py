"""What a broker counts about the tasks it moves: for STATS (the core answers it) and /metrics.

Pure bookkeeping that the core bumps once per commit and once per delivery, with the rows it
already has: counting a batch is a Counter over one of its columns (in C), a latency is one
weighted add per group of tasks that came due together (one submit's tasks delivered together),
so no Python object is made per task. The time comes in with each call, as for the core.

Definitions (docs/METRICS.md): *submitted* counts tasks created (not an idempotent repeat);
*delivered* tasks sent in a DELIVER; *completed*, *failed* and *dead* what this broker's commits
made of tasks (a failed run is counted whether it is retried or dead; dead counts those it
ended); *refused* the rows of workers' reports refused by their fencing. Start latency is from a
task's run_at (when it came due: its insert's transaction, or its delay or retry) to its DELIVER.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import compress, groupby
from operator import countOf, itemgetter
from typing import Any

from conduit.broker.writes import WriteBatch, WriteResult
from conduit.histogram import SIZES, Histogram, Recent
from conduit.task import LeasedTask, Outcome
from conduit.wire import DeliveryRow

REASONS = ("stale", "finished", "cancelled", "unknown")
SETTLING = frozenset({"renew", "complete", "fail", "release"})  # kinds whose refusals are counted
ENDINGS = ("completed", "failed", "dead")  # what a commit made of tasks, as the store counts it
_queue_of = itemgetter(0)  # of a TaskSpec
_created = itemgetter(1)  # of a Submitted
_row_queue = itemgetter(2)  # of a DeliveryRow
LATENCY_SAMPLES = 16  # tasks of one delivery timed, at most about (each for its share of them)
_task_queue = itemgetter(1)  # of a LeasedTask
_task_due = itemgetter(3)


@dataclass
class QueueTally:
    submitted: int = 0
    delivered: int = 0
    completed: int = 0
    failed: int = 0
    dead: int = 0
    latency: Histogram = field(default_factory=Histogram)  # since start, for /metrics
    recent: Recent = field(default_factory=Recent)  # the last minute, for STATS


@dataclass
class Tally:
    queues: dict[str, QueueTally] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    # as workers measured their runs (COMPLETE's and FAIL's `elapsed`)
    run_seconds: Histogram = field(default_factory=Histogram)
    commit_size: Histogram = field(default_factory=lambda: Histogram(SIZES))  # requests in one commit
    commit_seconds: Histogram = field(default_factory=Histogram)
    # Wall clock minus the events' monotonic clock, set by the shell: a run_at is wall time.
    clock_offset: float = 0.0

    def queue(self, name: str) -> QueueTally:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = QueueTally()
        return q

    def wall(self, now: float) -> datetime:
        """`now` (the events' clock) as the wall-clock time a run_at is written in."""
        return datetime.fromtimestamp(now + self.clock_offset, UTC)

    def committed(self, batch: WriteBatch, result: WriteResult, seconds: float) -> None:
        self.commit_size.add(len(batch.submits) + len(batch.ops))
        self.commit_seconds.add(seconds)
        for op, submitted in zip(batch.submits, result.submitted, strict=True):
            if not submitted:
                continue
            first = op.specs[0].queue
            if countOf(map(_queue_of, op.specs), first) == len(op.specs):  # one queue: the usual case
                self.queue(first).submitted += countOf(map(_created, submitted), True)
                continue
            for name, n in Counter(compress(map(_queue_of, op.specs), map(_created, submitted))).items():
                self.queue(name).submitted += n
        for request, outcomes in zip(batch.ops, result.outcomes, strict=True):
            if request.kind not in SETTLING:
                continue
            # Counted by identity (in C): hashing an enum member is a Python call.
            all_ok = outcomes.count(Outcome.OK) == len(outcomes)
            if not all_ok:
                for outcome in outcomes:
                    if outcome in self.refused:
                        self.refused[outcome] += 1
            elapsed = request.elapsed
            if elapsed is None:
                continue
            if all_ok and None not in elapsed:  # the usual case
                self.run_seconds.add_all(elapsed)  # type: ignore[arg-type]
            else:
                ok = zip(elapsed, outcomes, strict=True)
                self.run_seconds.add_all(e for e, o in ok if o is Outcome.OK and e is not None)
        self.ended(result.ended)

    def ended(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        """Tasks completed, failed and made dead, per queue, as the store counted its writes."""
        for ending, by_queue in counts.items():
            for name, n in by_queue.items():
                q = self.queue(name)
                setattr(q, ending, getattr(q, ending) + n)

    def delivered_buffered(self, tasks: list[LeasedTask], now: float) -> None:
        """Tasks handed out from the buffer, by queue. At most about LATENCY_SAMPLES of a delivery
        are timed, each standing for the tasks after it up to the next: tasks read back from the
        database each came due at their own time, and timing every one cost ~2 µs a task."""
        wall = now + self.clock_offset
        for name, of_queue in groupby(tasks, key=_task_queue):  # a poll's tasks come queue by queue
            group = list(of_queue)
            n = len(group)
            q = self.queue(name)
            q.delivered += n
            step = max(1, n // LATENCY_SAMPLES)
            for i in range(0, n, step):
                due = _task_due(group[i])
                if due is not None:
                    latency = max(0.0, wall - due.timestamp())
                    weight = min(step, n - i)
                    q.latency.add(latency, weight)
                    q.recent.add(now, latency, weight)

    def delivered_sync(self, rows: Iterable[DeliveryRow], latency: float, now: float) -> None:
        """Sync-matched tasks, delivered after the commit that inserted them, `latency` after it began."""
        for name, n in Counter(map(_row_queue, rows)).items():
            q = self.queue(name)
            q.delivered += n
            q.latency.add(latency, n)
            q.recent.add(now, latency, n)

    def body(self, depths: dict[str, tuple[int, int, int]], now: float) -> dict[str, Any]:
        """STATS' per-queue columns (the caller adds the broker's own fields)."""
        names = sorted(set(depths) | set(self.queues))
        rows = [self.queues.get(name) or QueueTally() for name in names]
        recent = [q.recent.merged(now) for q in rows]
        return {
            "queue": names,
            "buffered": [depths.get(name, (0, 0, 0))[0] for name in names],
            "polls": [depths.get(name, (0, 0, 0))[1] for name in names],
            **{key: [getattr(q, key) for q in rows] for key in ("submitted", "delivered", *ENDINGS)},
            "latency_p50": [h.quantile(0.5) for h in recent],
            "latency_p99": [h.quantile(0.99) for h in recent],
        }
