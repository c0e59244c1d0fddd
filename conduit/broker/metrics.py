"""A broker's /metrics (docs/METRICS.md): its core's tally and state as the main thread copies them
every second, the queue depths the keeper thread reads from the counters, and database errors.

A scrape runs on the HTTP server's thread and reads only those copies, never the core's live
structures, so it neither races the socket loop nor slows it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from conduit.broker.tally import ENDINGS, Tally
from conduit.histogram import SIZES, Histogram
from conduit.metrics import histogram_family

SNAPSHOT_EVERY = 1.0  # seconds between the main thread's copies
DEPTHS_EVERY = 5.0  # seconds between the keeper's reads of queue_stats()


@dataclass
class _Snapshot:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # queue -> submitted, delivered, ...
    latency: dict[str, Histogram] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    run_seconds: Histogram = field(default_factory=Histogram)
    commit_size: Histogram = field(default_factory=lambda: Histogram(SIZES))
    commit_seconds: Histogram = field(default_factory=Histogram)
    depths: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # core.depths()
    lease_valid: bool = False


class BrokerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors = 0
        self._snapshot = _Snapshot()
        self.queue_depths: dict[str, dict[str, int]] = {}  # replaced whole by the keeper thread

    def database_error(self) -> None:
        """Called from any database thread."""
        with self._lock:
            self._errors += 1

    def snapshot(self, tally: Tally, depths: dict[str, tuple[int, int, int]], lease_valid: bool) -> None:
        """Copy what scrapes show; on the main thread, which owns the tally."""
        queues = tally.queues
        self._snapshot = _Snapshot(
            counts={
                name: {key: getattr(q, key) for key in ("submitted", "delivered", *ENDINGS)}
                for name, q in queues.items()
            },
            latency={name: q.latency.copy() for name, q in queues.items()},
            refused=dict(tally.refused),
            run_seconds=tally.run_seconds.copy(),
            commit_size=tally.commit_size.copy(),
            commit_seconds=tally.commit_seconds.copy(),
            depths=dict(depths),
            lease_valid=lease_valid,
        )

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot
        for key, meaning in (
            ("submitted", "Tasks created by submits through this broker."),
            ("delivered", "Tasks this broker sent to workers in a DELIVER."),
            ("completed", "Tasks this broker's commits completed."),
            ("failed", "Failed runs this broker recorded (reports and lease expiries), retried or not."),
            ("dead", "Tasks this broker's commits made dead (out of attempts, or not to retry)."),
        ):
            family = CounterMetricFamily(f"conduit_tasks_{key}", meaning, labels=["queue"])
            for name, counts in sorted(s.counts.items()):
                family.add_metric([name], counts[key])
            yield family
        refused = CounterMetricFamily(
            "conduit_refused", "Report rows refused by their fencing, by reason.", labels=["reason"]
        )
        for reason, n in s.refused.items():
            refused.add_metric([reason], n)
        yield refused
        depth = GaugeMetricFamily(
            "conduit_queue_depth",
            "Tasks by queue and state, from the database's counters.",
            labels=["queue", "state"],
        )
        for name, states in sorted(self.queue_depths.items()):
            for state, n in sorted(states.items()):
                depth.add_metric([name, state], n)
        yield depth
        for index, metric, meaning in (
            (0, "conduit_buffered_tasks", "Tasks this broker holds for a queue and has not delivered."),
            (1, "conduit_waiting_polls", "Workers' polls waiting at this broker, by queue."),
        ):
            gauge = GaugeMetricFamily(metric, meaning, labels=["queue"])
            for name, values in sorted(s.depths.items()):
                gauge.add_metric([name], values[index])
            yield gauge
        yield histogram_family(
            "conduit_task_start_latency_seconds",
            "From a task's run_at (when it came due) to its DELIVER, by queue.",
            ["queue"],
            (([name], hist) for name, hist in sorted(s.latency.items())),
        )
        yield histogram_family(
            "conduit_task_run_seconds",
            "How long runs took, as workers reported them with COMPLETE and FAIL (elapsed).",
            [],
            [([], s.run_seconds)],
        )
        yield histogram_family(
            "conduit_commit_batch_size", "Requests in one group commit.", [], [([], s.commit_size)], SIZES
        )
        yield histogram_family(
            "conduit_commit_seconds", "Group commits, from issue to result.", [], [([], s.commit_seconds)]
        )
        yield GaugeMetricFamily(
            "conduit_broker_lease_valid",
            "1 while this broker's lease is valid, else 0.",
            value=int(s.lease_valid),
        )
        with self._lock:
            errors = self._errors
        yield CounterMetricFamily(
            "conduit_database_errors", "Database calls that failed (each retry counted).", value=errors
        )
