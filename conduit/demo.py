"""`conduit demo`: a broker and workers on the embedded PostgreSQL, a burst of tasks, the figures.

The handler returns the moment it started, so submit-to-start latency is measured from the time
each batch was sent (the intended send time) to the time a worker began the task.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import click

from conduit.client import Client, TaskContext, Worker
from conduit.store import Store

QUEUE = "conduit.demo"
worker = Worker(os.environ.get("CONDUIT_DEMO_ENDPOINT", "tcp://127.0.0.1:5555"), concurrency=8, prefetch=500)


@worker.handler(QUEUE)
def started_at(task: TaskContext) -> bytes:
    return struct.pack("!d", time.time())


@dataclass(frozen=True)
class Figures:
    tasks: int
    seconds: float
    start_ms: dict[str, float]
    complete_ms: dict[str, float]

    @property
    def per_second(self) -> float:
        return self.tasks / self.seconds


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": ordered[-1]}


class Cluster:
    """Brokers (with gossip) and worker processes, for the demo, the benchmarks and the examples;
    stopped gracefully on close, killed if need be. Demo worker i starts at broker i mod n and
    knows them all; `add_worker` starts others."""

    def __init__(self, dsn: str, schema: str, workers: int, brokers: int = 1) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.brokers: list[subprocess.Popen[str]] = []
        self.endpoints: list[str] = []
        conduit = [sys.executable, "-m", "conduit"]
        for _ in range(brokers):
            broker = self._start(
                [
                    *(*conduit, "broker", "--bind", "tcp://127.0.0.1:*", "--pub", "tcp://127.0.0.1:*"),
                    *("--dsn", dsn, "--schema", schema, "--log-level", "warning"),
                ]
            )
            assert broker.stdout is not None
            endpoint = broker.stdout.readline().strip()
            broker.stdout.readline()  # its gossip endpoint: peers learn it from PING
            if not endpoint:
                self.close()
                raise click.ClickException("a demo broker did not start")
            self.brokers.append(broker)
            self.endpoints.append(endpoint)
        for i in range(workers):
            mine = self.endpoints[i % brokers :] + self.endpoints[: i % brokers]
            connect = [arg for endpoint in mine for arg in ("--connect", endpoint)]
            self._start([*conduit, "worker", "conduit.demo:worker", *connect, "--log-level", "warning"])

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]

    def add_worker(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """One more worker process, of any program or language; close() stops it with the rest."""
        return self._start(cmd, env)

    def _start(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Workers first, all signalled at once (an idle one waits out its poll), then brokers: a
        worker whose broker went first would wait for a poll nobody answers."""
        workers = [p for p in self.procs if p not in self.brokers]
        for group in (workers, self.brokers):
            for proc in group:
                proc.terminate()
            for proc in group:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if proc.stdout:
                    proc.stdout.close()


def _nothing() -> None:
    return None


def burst(
    client: Client, store: Store, tasks: int, batch: int, producers: int, done: Callable[[], None] = _nothing
) -> Figures:
    """Submit `tasks` in batches from several threads, as fast as commits allow; workers drain
    them as they arrive. `done` is called once they all have, before their times are read."""
    sent_at: dict[int, float] = {}
    done_before = _completed(store)
    sizes = [min(batch, tasks - start) for start in range(0, tasks, batch)]

    def produce(n: int) -> int:
        t = time.time()
        ids = client.submit_batch(QUEUE, [b""] * n)  # columns: no record per task
        sent_at.update(dict.fromkeys(ids, t))
        return n

    began = time.time()
    with (
        click.progressbar(length=tasks, label="submitting", file=sys.stderr) as bar,
        ThreadPoolExecutor(producers) as pool,
    ):
        for n in pool.map(produce, sizes):
            bar.update(n)
    with click.progressbar(length=tasks, label="running", file=sys.stderr) as bar:
        seen = 0
        while seen < tasks:  # the counters, not a scan: cheap enough to ask often
            time.sleep(0.05)
            now_done = _completed(store) - done_before
            bar.update(now_done - seen)
            seen = now_done
    done()
    times = _times(store, list(sent_at))
    last = max(f for _, f in times.values())
    return _figures(sent_at, times, last - began)


def sync_match(client: Client, store: Store, tasks: int, done: Callable[[], None] = _nothing) -> Figures:
    """One task at a time to idle workers: the submit-to-start latency a waiting worker sees."""
    sent_at: dict[int, float] = {}
    began = time.time()
    with click.progressbar(length=tasks, label="one at a time", file=sys.stderr) as bar:
        for _ in range(tasks):
            t = time.time()
            task_id = client.submit(QUEUE, b"")
            sent_at[task_id] = t
            client.result(task_id, timeout=30)
            bar.update(1)
    seconds = time.time() - began
    done()
    return _figures(sent_at, _times(store, list(sent_at)), seconds)


def _completed(store: Store) -> int:
    store.compact_counts()
    return store.queue_stats().get(QUEUE, {}).get("completed", 0)


def _times(store: Store, ids: list[int]) -> dict[int, tuple[float, float]]:
    """(started, finished) wall times of completed tasks."""
    times: dict[int, tuple[float, float]] = {}
    for start in range(0, len(ids), 5000):
        for info in store.lookup(ids[start : start + 5000]):
            if info.state != "completed" or not info.result or not info.finished_at:
                raise click.ClickException(f"demo task {info.id} is {info.state}: {info.error}")
            times[info.id] = (struct.unpack("!d", info.result)[0], info.finished_at.timestamp())
    return times


def _figures(sent_at: dict[int, float], times: dict[int, tuple[float, float]], seconds: float) -> Figures:
    starts = [(s - sent_at[i]) * 1000 for i, (s, _) in times.items()]
    completes = [(f - sent_at[i]) * 1000 for i, (_, f) in times.items()]
    return Figures(len(times), seconds, percentiles(starts), percentiles(completes))


def report(figures: dict[str, Figures]) -> dict[str, Any]:
    return {
        name: {
            "tasks": f.tasks,
            "tasks_per_s": round(f.per_second, 1),
            "start_latency_ms": {k: round(v, 3) for k, v in f.start_ms.items()},
            "complete_latency_ms": {k: round(v, 3) for k, v in f.complete_ms.items()},
        }
        for name, f in figures.items()
    }
