"""A Worker's own metrics (`conduit worker --metrics HOST:PORT`, docs/METRICS.md): runs and failed
runs by queue, how long they ran, and the tasks it holds.

The worker's loop thread counts the outcomes it collects, per queue, each time it collects them
(the times it measured anyway for COMPLETE's and FAIL's `elapsed`, into a histogram); a scrape,
on the HTTP server's thread, reads copies of those counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from conduit.histogram import Histogram
from conduit.metrics import histogram_family


@dataclass
class _Queue:
    runs: int = 0
    failed: int = 0
    seconds: Histogram = field(default_factory=Histogram)


class WorkerMetrics:
    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self.running = 0  # set by the loop on each turn
        self.prefetched = 0

    def ran(self, queue: str, seconds: list[float], failed: int) -> None:
        """Runs of a queue ended, `failed` of them with a failure (on the loop's thread, once for
        all it collected at a time: a histogram's add_all, not an add per run)."""
        q = self._queues.get(queue)
        if q is None:
            q = self._queues[queue] = _Queue()
        q.runs += len(seconds)
        q.failed += failed
        q.seconds.add_all(seconds)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        queues = sorted(
            (name, _Queue(q.runs, q.failed, q.seconds.copy())) for name, q in dict(self._queues).items()
        )
        runs = CounterMetricFamily(
            "conduit_worker_tasks_run",
            "Runs this worker finished (ok or failed), by queue.",
            labels=["queue"],
        )
        failed = CounterMetricFamily(
            "conduit_worker_tasks_failed",
            "Runs this worker finished with a failure, by queue.",
            labels=["queue"],
        )
        for name, q in queues:
            runs.add_metric([name], q.runs)
            failed.add_metric([name], q.failed)
        yield runs
        yield failed
        yield histogram_family(
            "conduit_worker_task_run_seconds",
            "How long runs took, from handing the task to a handler to its outcome, by queue.",
            ["queue"],
            (([name], q.seconds) for name, q in queues),
        )
        yield GaugeMetricFamily("conduit_worker_tasks_running", "Tasks running now.", value=self.running)
        yield GaugeMetricFamily(
            "conduit_worker_tasks_prefetched", "Tasks held but not started yet.", value=self.prefetched
        )
