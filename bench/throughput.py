"""Throughput benchmark: Conduit's scenarios against a plain PostgreSQL queue, in one run.

    python bench/throughput.py [--quick] [--dsn DSN] [--json FILE] [--plot FILE.png] [options]
    python bench/throughput.py --metrics [--rounds N] [...]: what serving /metrics costs the burst

Measures, on this machine and this database, a plain FOR UPDATE SKIP LOCKED queue (fetch one /
ack one, and batches of 100) with as many worker processes as Conduit gets, the database's
ceiling (COPY in, delete, one process), then Conduit: burst, drain, steady, sync_match, paced,
deep_backlog and mesh_N. Each Conduit scenario runs in a schema of its own with its own brokers
and workers (conduit.demo's; paced's sleep, bench/paced.py), which are stopped and dropped
afterwards. Every step also reports the WAL and the rows it wrote per task (bench/walstats.py).
See bench/README.md for how to read the table, the JSON and the chart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import baseline
import click
import curve as bench_curve
import metrics_cost
import paced as paced_worker
import psycopg
from psycopg import sql
from walstats import WriteMeter, Writes

from conduit import demo
from conduit.client import Client
from conduit.client.channel import Channel
from conduit.config import Settings
from conduit.curve import ClientCurve, client_context
from conduit.errors import ConduitError
from conduit.store import Store, dsn_for, init_schema
from conduit.task import TaskSpec
from conduit.wire import Command

BACKLOG_QUEUE = "bench.backlog"  # the deep backlog's queue: no worker polls it
BACKLOG_BATCH = 10_000  # backlog tasks per insert
LATENCIES = ("p50", "p90", "p99", "max")
BENCH = Path(__file__).resolve().parent
PACED_SLEEP = 0.020  # paced handlers sleep 0 to this many seconds, uniformly
PACED_LAG = 2.0  # paced: tasks not done this long after the last submit are the lag
PACED_DRAIN = 10.0  # paced: how long after the last submit to wait for the rest at most
PACED_STALLED = 0.5  # paced: a worker below this share of its fair share in a window stalled there

# Sizes: the defaults take about three minutes on a 2-core machine, --quick under two.
FULL = {
    "tasks": 60_000,
    "backlog": 1_000_000,
    "single": 500,
    "rate": 800.0,
    "steady_seconds": 10.0,
    "paced_seconds": 20.0,
    "baseline_tasks": 10_000,
}
QUICK = {
    "tasks": 5_000,
    "backlog": 100_000,
    "single": 100,
    "rate": 800.0,
    "steady_seconds": 3.0,
    "paced_seconds": 2.0,
    "baseline_tasks": 2_000,
}


@dataclass(frozen=True)
class Plan:
    tasks: int
    payload: bytes
    producers: int
    workers: int
    concurrency: int
    prefetch: int
    brokers: list[int]
    batch: int
    backlog: int
    single: int
    rate: float
    steady_seconds: float
    steady_producers: int
    paced_seconds: float
    paced_rate: float
    paced_batch: int
    paced_workers: int
    paced_concurrency: int
    baseline_tasks: int
    drain_tasks: int
    curve: bool = False  # also the burst with CURVE on (burst_curve)


@dataclass(frozen=True)
class Result:
    name: str
    figures: demo.Figures
    rss_mb: float | None
    cpu_s: dict[str, float]  # CPU seconds by role while the scenario ran
    cpu_tasks: int  # tasks completed while the CPU was measured
    writes: Writes
    note: str = ""
    detail: dict[str, Any] | None = None  # a scenario's own figures (paced's per worker)


class Baseline(NamedTuple):
    per_second: float
    tasks: int
    writes: Writes


# -- processes and schemas -------------------------------------------------------------------


@dataclass(frozen=True)
class Workers:
    """A scenario's worker processes: which Worker they run (module:attribute, bench/ on the path)
    and how many tasks each runs and holds."""

    target: str
    count: int
    concurrency: int
    prefetch: int

    @classmethod
    def demo(cls, plan: Plan) -> Workers:
        return cls("conduit.demo:worker", plan.workers, plan.concurrency, plan.prefetch)

    @classmethod
    def paced(cls, plan: Plan) -> Workers:
        """Prefetch as much as concurrency (the Worker's default), so a worker holds few tasks
        beyond those it runs and the broker hands work to whoever asks."""
        return cls("paced:worker", plan.paced_workers, plan.paced_concurrency, plan.paced_concurrency)


class BenchCluster(demo.Cluster):
    """demo.Cluster running this scenario's workers, closed even when it fails to start. With
    `deferred`, only the brokers start, and start_workers() starts the workers later."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        workers: Workers,
        brokers: int,
        deferred: bool = False,
        broker_args: Sequence[str] = (),
        worker_args: Sequence[str] = (),
    ) -> None:
        self.workers = workers
        self.broker_args = list(broker_args)
        self.worker_args = list(worker_args)
        try:
            super().__init__(dsn, schema, 0 if deferred else workers.count, brokers)
        except BaseException:
            self.close()
            raise

    def start_workers(self) -> None:
        """The workers, as demo.Cluster starts them: worker i at broker i mod n, knowing all."""
        n = len(self.endpoints)
        for i in range(self.workers.count):
            connect = [
                arg for e in self.endpoints[i % n :] + self.endpoints[: i % n] for arg in ("--connect", e)
            ]
            self._start(
                [
                    sys.executable,
                    "-m",
                    "conduit",
                    "worker",
                    "conduit.demo:worker",
                    *connect,
                    "--log-level",
                    "warning",
                ]
            )

    def _start(self, cmd: list[str], env: dict[str, str] | None = None) -> Any:
        if cmd[3] == "broker":
            cmd += self.broker_args
        if cmd[3] == "worker":  # [python, -m, conduit, worker, conduit.demo:worker, ...]
            cmd[4] = self.workers.target
            cmd += ["--concurrency", str(self.workers.concurrency), "--prefetch", str(self.workers.prefetch)]
            cmd += self.worker_args
            path = os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))
            env = {**os.environ, "PYTHONPATH": path}
        return super()._start(cmd, env)

    def close(self) -> None:
        if hasattr(self, "procs"):  # absent when the first process failed to start
            super().close()


@contextlib.contextmanager
def scratch_schema(dsn: str, schema: str, conduit: bool = True) -> Iterator[str]:
    """A schema for one measurement (Conduit's tables in it if `conduit`), dropped afterwards."""
    if conduit:
        init_schema(dsn, schema)
    else:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield schema
    finally:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        except psycopg.Error as exc:
            progress(f"warning: could not drop schema {schema}: {exc}")


class RssSampler:
    """Peak resident memory (VmRSS) of some processes, sampled every 50 ms while in use."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except OSError:
                continue  # not Linux, or the process is gone

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mb(self) -> float | None:
        return round(self.peak_kb / 1024, 1) if self.peak_kb else None


class CpuMeter:
    """CPU time (user + system) spent by each role while in use: what bounds throughput when
    every process shares the same cores. PostgreSQL is every process named postgres here."""

    def __init__(self, roles: dict[str, Sequence[int]]) -> None:
        self.roles = {**roles, "bench_process": [os.getpid()]}
        self.seconds: dict[str, float] = {}

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0  # gone, or not Linux
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _postgres(self) -> list[int]:
        pids = []
        for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and Path(entry.path, "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
        return pids

    def _read(self) -> dict[str, dict[int, float]]:
        roles = {**self.roles, "postgres": self._postgres()}
        return {role: {pid: self._cpu(pid) for pid in pids} for role, pids in roles.items()}

    def __enter__(self) -> CpuMeter:
        self._before = self._read()
        self._stopped = False
        return self

    def stop(self) -> None:
        """The scenario's work is done: what comes after (the bench reading every task's times
        back, 100 µs of PostgreSQL a task in a burst) is the bench's, not Conduit's."""
        if self._stopped:
            return
        self._stopped = True
        after = self._read()
        self.seconds = {
            role: sum(t - self._before[role].get(pid, 0.0) for pid, t in pids.items())
            for role, pids in after.items()
        }

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PayloadClient:
    """The Client as demo.burst and demo.sync_match use it, but every task carries this run's
    payload (they submit empty ones)."""

    def __init__(self, client: Client, payload: bytes) -> None:
        self.client = client
        self.payload = payload

    def submit_batch(self, queue: str, payloads: Sequence[bytes], **options: Any) -> list[int]:
        return self.client.submit_batch(queue, [self.payload] * len(payloads), **options)

    def submit(self, queue: str, payload: bytes, **options: Any) -> int:
        return self.client.submit(queue, self.payload, **options)

    def result(self, task_id: int, timeout: float | None = None) -> Any:
        return self.client.result(task_id, timeout)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- scenarios -------------------------------------------------------------------------------


class Measured(NamedTuple):
    figures: demo.Figures
    note: str = ""
    detail: dict[str, Any] | None = None


# (client, store, worker pids, done): a body calls done() once its tasks are all done, before it
# reads their times back, so that reading is left out of the CPU figures.
Body = Callable[[Any, Store, list[int], Callable[[], None]], Measured]


Prefill = Callable[[Any], None]  # (client): submits a drain's tasks before any worker starts


def run_conduit(
    dsn: str,
    plan: Plan,
    name: str,
    brokers: int,
    body: Body,
    backlog: int = 0,
    workers: Workers | None = None,
    prefill: Prefill | None = None,
    keys: bench_curve.BenchKeys | None = None,
    broker_args: Sequence[str] = (),
) -> Result:
    """One scenario in a schema of its own. With `prefill`, the brokers start alone, `prefill`
    submits, then the workers start, and the CPU is measured from the first completion on. With
    `keys`, every broker, worker and producer socket is CURVE."""
    workers = workers or Workers.demo(plan)
    with scratch_schema(dsn, f"bench_{os.getpid()}_{name}") as schema:
        if backlog:
            fill_backlog(dsn, schema, backlog, plan.payload)
        with WriteMeter(dsn, schema) as writes:  # left once every connection of the scenario closed
            began = time.monotonic()
            cluster = BenchCluster(
                dsn,
                schema,
                workers,
                brokers,
                deferred=prefill is not None,
                broker_args=[*(keys.broker_args if keys else ()), *broker_args],
                worker_args=keys.worker_args if keys else (),
            )
            curve = keys.client if keys else None
            try:
                # Every broker's gossip endpoint given, so the producer spreads its submits over all
                # of them (a Client otherwise asks only the first broker that answers for its gossip).
                gossip = gossip_endpoints(cluster.endpoints, curve)
                with (
                    Client(cluster.endpoints, gossip=gossip, curve=curve) as client,
                    Store.open(dsn, schema=schema) as store,
                ):
                    producer = PayloadClient(client, plan.payload)
                    done_before = 0
                    if prefill:
                        wait_ready(client, brokers, 0)
                        prefill(producer)
                        cluster.start_workers()
                        done_before = first_completion(store)
                    else:
                        wait_ready(client, brokers, workers.count)
                    up = time.monotonic() - began
                    progress(f"  {brokers} broker(s) and {workers.count} workers up in {up:.1f} s")
                    brokers_pids = [p.pid for p in cluster.brokers]
                    workers_pids = [p.pid for p in cluster.procs if p not in cluster.brokers]
                    with (
                        RssSampler(brokers_pids) as rss,
                        CpuMeter({"brokers": brokers_pids, "workers": workers_pids}) as cpu,
                    ):
                        measured = body(producer, store, workers_pids, cpu.stop)
                    note = "; ".join(filter(None, [measured.note, redeliveries(store)]))
            finally:
                began = time.monotonic()
                cluster.close()
                progress(f"  stopped in {time.monotonic() - began:.1f} s")
    cpu_tasks = measured.figures.tasks - done_before
    return Result(
        name, measured.figures, rss.peak_mb, cpu.seconds, cpu_tasks, writes.writes, note, measured.detail
    )


def first_completion(store: Store, timeout: float = 60.0) -> int:
    """Tasks completed once the first one is: a drain's CPU is measured from there, so that the
    worker processes' start-up (imports, connecting) does not count against its tasks."""
    deadline = time.monotonic() + timeout
    while not (done := demo._completed(store)):
        if time.monotonic() > deadline:
            raise click.ClickException(f"no task completed within {timeout:.0f} s of the workers' start")
        time.sleep(0.01)
    return done


def gossip_endpoints(endpoints: Sequence[str], curve: ClientCurve | None = None) -> list[str]:
    """Each broker's gossip (PUB) endpoint, as its PONG names it."""
    ctx = client_context(curve)
    try:
        pubs = []
        for endpoint in endpoints:
            channel = Channel(ctx, endpoint)
            try:
                pubs.append(str(channel.request(Command.PING, {}, 10.0).body["pub"]))
            finally:
                channel.close()
        return pubs
    finally:
        ctx.term()


def redeliveries(store: Store) -> str:
    """A health check on the run: tasks that ran only after a lease expired (a lost delivery,
    30 s by default), and tasks leased more than once (given back by a broker, leased again)."""
    try:
        failed, again = store.conn.execute(
            "SELECT count(*) FILTER (WHERE failures > 0), count(*) FILTER (WHERE attempt > 1) "
            "FROM results WHERE queue = %s",
            (demo.QUEUE,),
        ).fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
        return "no health check: the schema has no results table with failures and attempt"
    parts = []
    if failed:
        parts.append(f"{failed} tasks ran only after a lease expired (failures > 0)")
    if again:
        parts.append(f"{again} tasks were leased more than once (attempt > 1)")
    return ", ".join(parts)


def wait_ready(client: Client, brokers: int, workers: int, timeout: float = 30.0) -> None:
    """Until gossip shows every broker and a waiting poll from every worker."""
    client.ping()  # the client joins the brokers' gossip
    deadline = time.monotonic() + timeout
    while True:
        live = client.brokers()
        if len(live) >= brokers and sum(b.polls([demo.QUEUE]) for b in live) >= workers:
            break
        if time.monotonic() > deadline:
            raise click.ClickException(f"{brokers} broker(s) and {workers} workers did not come up")
        time.sleep(0.05)
    if brokers > 1:
        time.sleep(1.0)  # a couple of gossip rounds, so that workers hear of every broker too


def fill_backlog(dsn: str, schema: str, tasks: int, payload: bytes) -> None:
    """`tasks` pending tasks in a queue no worker polls, put in by the store's own bulk insert (so
    whatever the schema's shape) in batches of BACKLOG_BATCH, then vacuumed and analysed as a
    backlog that has been there a while would be."""
    progress(f"  inserting a backlog of {tasks:,} pending tasks ...")
    began = time.perf_counter()
    with Store.open(dsn, schema=schema) as store:
        for start in range(0, tasks, BACKLOG_BATCH):
            store.enqueue([TaskSpec(BACKLOG_QUEUE, payload)] * min(BACKLOG_BATCH, tasks - start))
        store.conn.execute("VACUUM ANALYZE tasks")
    checkpoint(dsn)
    progress(f"  backlog in place in {time.perf_counter() - began:.1f} s")


def burst(plan: Plan) -> Body:
    def body(client: Any, store: Store, _: list[int], done: Callable[[], None]) -> Measured:
        return Measured(demo.burst(client, store, plan.tasks, plan.batch, plan.producers, done))

    return body


def drain(plan: Plan) -> tuple[Prefill, Body]:
    """`drain_tasks` submitted (in batches, from the producer threads) and committed before any
    worker starts, then drained: the shape of the batch-100 baseline. The clock runs from the
    first task's start to the last completion, and every task counts as offered at that start,
    so its submit->start latency is its place in the drain."""
    ids: list[int] = []

    def prefill(client: Any) -> None:
        n = plan.drain_tasks
        sizes = [min(plan.batch, n - start) for start in range(0, n, plan.batch)]
        submit = lambda k: client.submit_batch(demo.QUEUE, [b""] * k)  # noqa: E731
        with (
            ThreadPoolExecutor(plan.producers) as pool,
            click.progressbar(length=n, label="submitting, no worker yet", file=sys.stderr) as bar,
        ):
            for batch in pool.map(submit, sizes):
                ids.extend(batch)
                bar.update(len(batch))

    def body(client: Any, store: Store, _: list[int], done: Callable[[], None]) -> Measured:
        wait_done(store, 0, len(ids))
        done()
        times = demo._times(store, ids)
        began = min(started for started, _ in times.values())
        ended = max(finished for _, finished in times.values())
        return Measured(demo._figures(dict.fromkeys(ids, began), times, ended - began))

    return prefill, body


def sync_match(plan: Plan) -> Body:
    def body(client: Any, store: Store, _: list[int], done: Callable[[], None]) -> Measured:
        return Measured(demo.sync_match(client, store, plan.single, done))

    return body


def steady(plan: Plan) -> Body:
    """Producers submit one task at a time on a fixed schedule (`rate` a second in all); each
    task's latency counts from when the schedule said to send it, so a producer that falls
    behind (a slow submit) adds its delay to every task after it (no coordinated omission)."""

    def body(client: Any, store: Store, _: list[int], done: Callable[[], None]) -> Measured:
        tasks = max(1, int(plan.rate * plan.steady_seconds))
        sent_at: dict[int, float] = {}
        producers = plan.steady_producers
        lag = [0.0] * producers
        done_before = demo._completed(store)
        began = time.time() + 0.05

        def produce(k: int) -> int:
            for i in range(k, tasks, producers):
                due = began + i / plan.rate
                if (wait := due - time.time()) > 0:
                    time.sleep(wait)
                else:
                    lag[k] = max(lag[k], -wait)
                sent_at[client.submit(demo.QUEUE, b"")] = due
            return k

        with (
            ThreadPoolExecutor(producers) as pool,
            click.progressbar(length=tasks, label=f"{plan.rate:,.0f} a second", file=sys.stderr) as bar,
        ):
            futures = [pool.submit(produce, k) for k in range(producers)]
            seen = 0
            while not all(f.done() for f in futures):
                time.sleep(0.05)
                bar.update(len(sent_at) - seen)
                seen = len(sent_at)
            for f in futures:
                f.result()  # a producer's error, raised here
            bar.update(tasks - seen)
        wait_done(store, done_before, tasks)
        done()
        times = demo._times(store, list(sent_at))
        figures = demo._figures(sent_at, times, max(f for _, f in times.values()) - began)
        note = f"offered {plan.rate:,.0f}/s; producers fell behind by {max(lag) * 1000:,.1f} ms at most"
        if max(lag) > 0.1:
            note += (
                " (more than the producers could send one at a time: latency includes their own"
                " queueing; lower --rate or raise --steady-producers)"
            )
        return Measured(figures, note)

    return body


def wait_done(store: Store, done_before: int, tasks: int, until: float = math.inf) -> None:
    """Until `tasks` more have completed, or the wall clock passes `until`."""
    with click.progressbar(length=tasks, label="running", file=sys.stderr) as bar:
        seen = 0
        while seen < tasks and time.time() < until:
            time.sleep(0.05)
            now_done = demo._completed(store) - done_before
            bar.update(now_done - seen)
            seen = now_done


def paced(plan: Plan) -> Body:
    """Batches of `paced_batch` tasks at `paced_rate` a second, below capacity, each task sleeping
    0-20 ms. The question is not capacity but whether every worker keeps up with its share all
    along: a worker whose loop is no longer woken by finishing handlers (issue 12's lost wake-up
    ran `concurrency` tasks per 100 ms poll tick) falls behind and sits on its tasks, which a
    saturated burst never shows (a stream of deliveries wakes every worker)."""

    def body(client: Any, store: Store, workers: list[int], done: Callable[[], None]) -> Measured:
        interval = plan.paced_batch / plan.paced_rate
        batches = max(1, round(plan.paced_seconds / interval))
        rng = random.Random(12)  # the same load every run
        sent_at: dict[int, float] = {}
        behind = 0.0
        done_before = demo._completed(store)
        began = time.time() + 0.05
        label = f"{plan.paced_rate:,.0f} a second in batches of {plan.paced_batch}"
        with click.progressbar(range(batches), label=label, file=sys.stderr) as bar:
            for k in bar:
                naps = [rng.uniform(0, PACED_SLEEP) for _ in range(plan.paced_batch)]
                specs = [TaskSpec(demo.QUEUE, paced_worker.payload(t, len(plan.payload))) for t in naps]
                due = began + k * interval
                if (wait := due - time.time()) > 0:
                    time.sleep(wait)
                else:
                    behind = max(behind, -wait)
                # The raw client: PayloadClient would replace the payloads that say how long to sleep.
                sent_at.update(dict.fromkeys(client.client.submit_many(specs), due))
        last = time.time()
        wait_done(store, done_before, len(sent_at), until=last + PACED_DRAIN)
        done()
        runs = paced_runs(store, list(sent_at))
        if not runs:
            raise click.ClickException("paced: no task completed")
        times = {i: (started, finished) for i, (_, started, finished) in runs.items()}
        figures = demo._figures(sent_at, times, max(f for _, f in times.values()) - began)
        detail = paced_detail(plan, workers, sent_at, runs, began, last)
        note = (
            f"offered {plan.paced_rate:,.0f}/s; the producer fell behind by {behind * 1000:,.1f} ms at most"
        )
        if len(runs) < len(sent_at):
            note += f"; {len(sent_at) - len(runs):,} tasks not done {PACED_DRAIN:.0f} s after the last submit"
        return Measured(figures, note, detail)

    return body


def paced_runs(store: Store, ids: list[int]) -> dict[int, tuple[int, float, float]]:
    """Completed tasks: (pid of the worker that ran it, started, finished) wall times."""
    runs = {}
    for start in range(0, len(ids), 5000):
        for info in store.lookup(ids[start : start + 5000]):
            if info.state == "completed" and info.result and info.finished_at:
                started, pid = paced_worker.RESULT.unpack(info.result)
                runs[info.id] = (pid, started, info.finished_at.timestamp())
    return runs


def paced_detail(
    plan: Plan,
    workers: list[int],
    sent_at: dict[int, float],
    runs: dict[int, tuple[int, float, float]],
    began: float,
    last: float,
) -> dict[str, Any]:
    """Per worker, completions in each window of the offered span as a ratio of its fair share
    (the offered rate over the workers), and the lag: tasks not done PACED_LAG s after the last
    submit. A worker that ran nothing is listed all the same."""
    offered = len(sent_at)
    span = offered / plan.paced_rate
    window = float(max(1, math.ceil(span / 20)))  # at most about 20 windows
    windows = max(1, math.ceil(round(span / window, 6)))
    fair = plan.paced_rate / len(workers)
    not_done = offered - sum(finished <= last + PACED_LAG for _, _, finished in runs.values())
    per_worker = []
    for n, pid in enumerate(workers + sorted({r[0] for r in runs.values()} - set(workers)), 1):
        mine = [(i, started, finished) for i, (p, started, finished) in runs.items() if p == pid]
        counts = [0] * windows
        for _, _, finished in mine:
            if 0 <= (k := int((finished - began) // window)) < windows:
                counts[k] += 1
        ratios = [round(c / (fair * window), 2) for c in counts]
        starts = [(started - sent_at[i]) * 1000 for i, started, _ in mine]
        per_worker.append(
            {
                "worker": n,
                "pid": pid,
                "tasks": len(mine),
                "share": round(len(mine) / (offered / len(workers)), 2),
                "window_ratio": {"min": min(ratios), "p50": statistics.median(ratios), "max": max(ratios)},
                "stalled_windows": sum(r < PACED_STALLED for r in ratios),
                "windows": ratios,
                "start_latency_ms": {k: round(v, 1) for k, v in demo.percentiles(starts or [0.0]).items()},
            }
        )
    return {
        "offered_per_s": plan.paced_rate,
        "offered_tasks": offered,
        "batch": plan.paced_batch,
        "seconds": round(span, 1),
        "handler_sleep_ms": [0, PACED_SLEEP * 1000],
        "workers": len(workers),
        "concurrency": plan.paced_concurrency,
        "fair_share_per_s": round(fair, 1),
        "window_s": window,
        "not_done_after_s": PACED_LAG,
        "not_done": not_done,
        "not_done_ratio": round(not_done / offered, 3),
        "stalled_below": PACED_STALLED,
        "per_worker": per_worker,
    }


# -- the run ---------------------------------------------------------------------------------


def machine(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        show = lambda name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]  # noqa: E731
        return {
            "cores": os.cpu_count(),
            "postgres_version": show("server_version"),
            "fsync": show("fsync"),
            "synchronous_commit": show("synchronous_commit"),
        }


def checkpoint(dsn: str) -> None:
    """Start each step with the WAL written out, so that one step's writes (a million-task backlog)
    do not come due as a checkpoint in the middle of the next. Needs superuser or pg_checkpoint."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        progress("  (no privilege to CHECKPOINT between steps: steps may pay for each other's writes)")


def run(dsn: str, plan: Plan) -> dict[str, Any]:
    info = machine(dsn)
    progress(
        f"{info['cores']} cores, PostgreSQL {info['postgres_version']}, fsync={info['fsync']}, "
        f"synchronous_commit={info['synchronous_commit']}"
    )
    pid = os.getpid()
    steps: list[tuple[str, Callable[[], Any]]] = []
    figures: dict[str, Any] = {}

    def plain(batch: int, tasks: int) -> Baseline:
        with (
            scratch_schema(dsn, f"bench_{pid}_plain_{batch}", conduit=False) as schema,
            WriteMeter(dsn, schema) as writes,
        ):
            rate = baseline.plain_queue(dsn, schema, tasks, plan.workers, batch, plan.payload)
        return Baseline(rate, tasks, writes.writes)

    def ceiling() -> Baseline:
        with (
            scratch_schema(dsn, f"bench_{pid}_ceiling", conduit=False) as schema,
            WriteMeter(dsn, schema) as writes,
        ):
            rate = baseline.db_ceiling(dsn, schema, plan.baseline_tasks * 20, 500, plan.payload)
        return Baseline(rate, plan.baseline_tasks * 20, writes.writes)

    def secure_burst() -> Result:
        with bench_curve.BenchKeys() as keys:
            return run_conduit(dsn, plan, "burst_curve", 1, burst(plan), keys=keys)

    def drained() -> Result:
        prefill, body = drain(plan)
        return run_conduit(dsn, plan, "drain", 1, body, prefill=prefill)

    steps += [
        ("fetch_one", lambda: plain(1, plan.baseline_tasks)),
        ("batch_100", lambda: plain(100, plan.baseline_tasks * 10)),
        ("db_ceiling", ceiling),
        ("burst", lambda: run_conduit(dsn, plan, "burst", 1, burst(plan))),
    ]
    if plan.curve:  # the burst with CURVE next to the one without, and nothing else
        steps.append(("burst_curve", secure_burst))
    else:
        steps += [
            ("drain", drained),
            ("steady", lambda: run_conduit(dsn, plan, "steady", 1, steady(plan))),
            ("sync_match", lambda: run_conduit(dsn, plan, "sync_match", 1, sync_match(plan))),
            ("paced", lambda: run_conduit(dsn, plan, "paced", 1, paced(plan), workers=Workers.paced(plan))),
            (
                "deep_backlog",
                lambda: run_conduit(dsn, plan, "deep_backlog", 1, burst(plan), backlog=plan.backlog),
            ),
        ]
        for n in plan.brokers:
            steps.append((f"mesh_{n}", lambda n=n: run_conduit(dsn, plan, f"mesh_{n}", n, burst(plan))))
    for i, (name, step) in enumerate(steps, 1):
        progress(f"[{i}/{len(steps)}] {name}")
        checkpoint(dsn)
        began = time.monotonic()
        figures[name] = step()
        progress(f"[{i}/{len(steps)}] {name}: done in {time.monotonic() - began:.1f} s")
    return {"machine": info, **figures}


def metrics_run(dsn: str, plan: Plan, rounds: int) -> dict[str, Any]:
    """The burst without and with a broker serving /metrics (scraped every second), alternating."""
    plain: list[Result] = []
    served: list[Result] = []
    scrapes = samples = 0
    for i in range(rounds):
        for serving in (False, True) if i % 2 == 0 else (True, False):
            name = f"burst_{'metrics' if serving else 'plain'}_{i}"
            progress(f"[{len(plain) + len(served) + 1}/{2 * rounds}] {name}")
            checkpoint(dsn)
            if not serving:
                plain.append(run_conduit(dsn, plan, name, 1, burst(plan)))
                continue
            port = metrics_cost.free_port()
            scraper = metrics_cost.Scraper(port)

            def scraped(
                client: Any, store: Store, pids: list[int], done: Callable[[], None], s: Any = scraper
            ) -> Measured:
                with s:
                    return burst(plan)(client, store, pids, done)

            served.append(
                run_conduit(dsn, plan, name, 1, scraped, broker_args=["--metrics", f"127.0.0.1:{port}"])
            )
            scrapes += scraper.scrapes
            samples = max(samples, scraper.samples // max(1, scraper.scrapes))
    doc = metrics_cost.summary(plain, served)
    return {**doc, "scrapes": scrapes, "samples_per_scrape": samples}


def document(measured: dict[str, Any]) -> dict[str, Any]:
    """The one JSON object: machine, baseline, db_ceiling_tasks_per_s, scenarios."""
    fetch_one, batch_100 = measured["fetch_one"].per_second, measured["batch_100"].per_second
    scenarios = []
    for result in measured.values():
        if not isinstance(result, Result):
            continue
        (row,) = demo.report({result.name: result.figures}).values()
        entry = {
            "name": result.name,
            **row,
            "ratio_to_baseline": round(result.figures.per_second / fetch_one, 2),
            "ratio_to_batch_100": round(result.figures.per_second / batch_100, 2),
            **result.writes.per_task(result.figures.tasks),
        }
        if result.rss_mb is not None:
            entry["broker_rss_mb"] = result.rss_mb
        per_task = {role: round(s / max(1, result.cpu_tasks) * 1e6, 1) for role, s in result.cpu_s.items()}
        entry["cpu_us_per_task"] = {**per_task, "total": round(sum(per_task.values()), 1)}
        if result.detail:
            entry[result.name] = result.detail
        scenarios.append(entry)
    info = measured["machine"]
    return {
        "machine": {k: info[k] for k in ("cores", "postgres_version", "fsync")},
        "baseline": {
            "fetch_one_tasks_per_s": round(fetch_one, 1),
            "batch_100_tasks_per_s": round(batch_100, 1),
            "writes": {
                name: measured[name].writes.per_task(measured[name].tasks)
                for name in ("fetch_one", "batch_100", "db_ceiling")
            },
        },
        "db_ceiling_tasks_per_s": round(measured["db_ceiling"].per_second, 1),
        "scenarios": scenarios,
    }


def ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def table(doc: dict[str, Any], measured: dict[str, Any], plan: Plan) -> str:
    m = doc["machine"]
    fetch_one = doc["baseline"]["fetch_one_tasks_per_s"]
    batch_100 = doc["baseline"]["batch_100_tasks_per_s"]
    ceiling = doc["db_ceiling_tasks_per_s"]
    lines = [
        f"{m['cores']} cores, PostgreSQL {m['postgres_version']}, fsync={m['fsync']}, "
        f"synchronous_commit={measured['machine']['synchronous_commit']}; {plan.workers} worker processes "
        f"(concurrency {plan.concurrency}, prefetch {plan.prefetch}), {plan.producers} producers, "
        f"submit batches of {plan.batch}, payload {len(plan.payload)} B",
        "",
        f"{'':<14}{'':>9}{'':>10}{'x fetch':>8}{'x batch':>8}{'% db':>6}  {'submit->start ms':^27}  "
        f"{'submit->complete ms':^27}{'broker':>8}",
        f"{'scenario':<14}{'tasks':>9}{'tasks/s':>10}{'-one':>8}{'-100':>8}{'ceil':>6}  "
        + f"{'p50':>6}{'p90':>7}{'p99':>7}{'max':>7}  " * 2
        + f"{'RSS MB':>6}",
    ]
    for s in doc["scenarios"]:
        st, co = s["start_latency_ms"], s["complete_latency_ms"]
        lat = "  ".join("".join(f"{ms(d[k]):>{6 if k == 'p50' else 7}}" for k in LATENCIES) for d in (st, co))
        rss = f"{s['broker_rss_mb']:>8.0f}" if "broker_rss_mb" in s else f"{'':>8}"
        lines.append(
            f"{s['name']:<14}{s['tasks']:>9,}{s['tasks_per_s']:>10,.0f}{s['ratio_to_baseline']:>8.1f}"
            f"{s['ratio_to_batch_100']:>8.2f}{100 * s['tasks_per_s'] / ceiling:>5.0f}%  {lat}{rss}"
        )
    baselines = [
        ("plain SKIP LOCKED queue, fetch one / ack one", fetch_one, f"({plan.workers} processes)"),
        ("plain SKIP LOCKED queue, batches of 100", batch_100, f"({plan.workers} processes, drain only)"),
        ("database ceiling: COPY 500 in, delete 500", ceiling, "(one process)"),
    ]
    lines.append("")
    for label, rate, who in baselines:
        lines.append(
            f"{label:<50}{rate:>10,.0f}{rate / fetch_one:>8.1f}{rate / batch_100:>8.2f}"
            f"{100 * rate / ceiling:>5.0f}%   {who}"
        )
    lines += ["", *writes_table(doc)]
    cores = m["cores"] or 1
    lines += [
        "",
        f"CPU per task, microseconds (user + system, while the scenario ran; the bound is {cores} cores "
        "divided by the total)",
        f"{'scenario':<14}{'brokers':>9}{'workers':>9}{'bench':>9}{'postgres':>9}{'total':>9}{'bound/s':>10}",
    ]
    for s in doc["scenarios"]:
        c = s["cpu_us_per_task"]
        paced = s["name"] in ("steady", "sync_match", "paced")  # idle between tasks: no CPU bound
        bound = f"{cores * 1e6 / c['total']:>10,.0f}" if c["total"] and not paced else f"{'paced':>10}"
        lines.append(
            f"{s['name']:<14}{c['brokers']:>9.1f}{c['workers']:>9.1f}{c['bench_process']:>9.1f}"
            f"{c['postgres']:>9.1f}{c['total']:>9.1f}{bound}"
        )
    for s in doc["scenarios"]:
        if "paced" in s:
            lines += ["", *paced_table(s["paced"])]
    notes = [f"{r.name}: {r.note}" for r in measured.values() if isinstance(r, Result) and r.note]
    if "drain" in measured:
        notes.append(
            f"drain: {plan.drain_tasks:,} tasks committed before the workers started; timed from the first "
            "task's start, CPU from the first completion"
        )
    if "deep_backlog" in measured:
        notes.append(f"deep_backlog: {plan.backlog:,} pending tasks in another queue of the same table")
    notes += curve_note(doc)
    return "\n".join([*lines, "", *notes])


def curve_note(doc: dict[str, Any]) -> list[str]:
    """What CURVE cost: burst_curve against burst, CPU per task by role and throughput."""
    by_name = {s["name"]: s for s in doc["scenarios"]}
    if "burst_curve" not in by_name:
        return []
    plain, secure = by_name["burst"], by_name["burst_curve"]
    extra = {k: secure["cpu_us_per_task"][k] - plain["cpu_us_per_task"][k] for k in plain["cpu_us_per_task"]}
    ours = sum(v for k, v in extra.items() if k not in ("postgres", "total"))
    roles = ", ".join(f"{k} {v:+.1f}" for k, v in extra.items() if k not in ("postgres", "total"))
    return [
        f"burst_curve: CURVE on every socket costs {ours:+.1f} us of CPU per task in the processes that "
        f"encrypt ({roles}); PostgreSQL, which CURVE does not touch, {extra['postgres']:+.1f} (any "
        f"process named postgres on the machine); {secure['tasks_per_s'] / plain['tasks_per_s']:.2f}x "
        "the plain burst's tasks/s"
    ]


def writes_table(doc: dict[str, Any]) -> list[str]:
    """WAL and rows written per task, each step in its own schema, baselines last."""
    lines = [
        "Writes per task (WAL: pg_current_wal_lsn() around the step, the whole server's; rows: "
        "pg_stat_user_tables, every table of the step's schema)",
        f"{'scenario':<14}{'WAL bytes':>10}{'inserted':>10}{'updated':>9}{'HOT':>7}{'non-HOT':>9}"
        f"{'deleted':>9}",
    ]
    named = [(s["name"], s) for s in doc["scenarios"]]
    named += [(f"[{name}]", w) for name, w in doc["baseline"]["writes"].items()]
    for name, w in named:
        r = w["rows_per_task"]
        lines.append(
            f"{name:<14}{w['wal_bytes_per_task']:>10,.0f}{r['inserted']:>10.2f}{r['updated']:>9.2f}"
            f"{r['hot_updated']:>7.2f}{r['updated'] - r['hot_updated']:>9.2f}{r['deleted']:>9.2f}"
        )
    return lines


SPARK = "▁▂▃▄▅▆▇█"  # a window's ratio to the fair share, to the nearest quarter: ▅ is 1.0


def paced_table(p: dict[str, Any]) -> list[str]:
    """Each paced worker's share over time, and a verdict a reader need not work out."""
    window = f"{p['window_s']:.0f}-s"
    lines = [
        f"paced: {p['offered_per_s']:,.0f} tasks/s offered in batches of {p['batch']} for "
        f"{p['seconds']:.0f} s to {p['workers']} workers of concurrency {p['concurrency']} (prefetch as "
        f"much), handlers sleeping {p['handler_sleep_ms'][0]:.0f}-{p['handler_sleep_ms'][1]:.0f} ms: "
        f"fair share {p['fair_share_per_s']:,.0f}/s a worker",
        f"not done {p['not_done_after_s']:.0f} s after the last submit: {p['not_done']:,} of "
        f"{p['offered_tasks']:,} ({100 * p['not_done_ratio']:.1f}%)",
        f"completions per {window} window over the fair share (1.00 = {p['fair_share_per_s']:,.0f}/s); "
        f"a window under {p['stalled_below']:.2f} is a stall",
        f"{'worker':<8}{'pid':>8}{'tasks':>8}{'share':>7}{'min':>6}{'p50':>6}{'max':>6}{'stalled':>9}"
        f"{'start p50 / p99 ms':>20}  over time (▁ 0, ▅ 1.0, █ 1.75+)",
    ]
    stalled = []
    for w in p["per_worker"]:
        st, n = w["start_latency_ms"], len(w["windows"])
        spark = "".join(SPARK[min(len(SPARK) - 1, round(x * 4))] for x in w["windows"])
        ratios = "".join(f"{w['window_ratio'][k]:>6.2f}" for k in ("min", "p50", "max"))
        lines.append(
            f"{w['worker']:<8}{w['pid']:>8}{w['tasks']:>8,}{w['share']:>7.2f}{ratios}"
            f"{w['stalled_windows']:>6}/{n:<2}{ms(st['p50']):>11} / {ms(st['p99']):<6}  {spark}"
        )
        if w["stalled_windows"]:
            stalled.append(f"worker {w['worker']} in {w['stalled_windows']} of {n} windows")
    if stalled or p["not_done"]:
        who = ", ".join(stalled) or "no single worker"
        late = f"{p['not_done']:,} tasks not done in time" if p["not_done"] else "others did it all in time"
        lines.append(f"verdict: STALLED: {who}; {late}")
    else:
        lines.append("verdict: no worker stalled, and every task was done in time")
    return lines


def plot(path: Path, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = doc["scenarios"]
    paced = next((s["paced"] for s in scenarios if "paced" in s), None)
    rows = 3 if paced else 2
    fig, axes = plt.subplots(rows, 1, figsize=(11, 5 * rows), height_ratios=[1, 1.1, 0.8][:rows])
    top, bottom = axes[0], axes[1]
    m = doc["machine"]
    fig.suptitle(
        f"Conduit throughput benchmark: {m['cores']} cores, PostgreSQL {m['postgres_version']}, "
        f"fsync={m['fsync']}"
    )

    fetch_one = doc["baseline"]["fetch_one_tasks_per_s"]
    kinds = {
        "steady": "steady (rate set by --rate)",
        "sync_match": "sync_match (one at a time)",
        "paced": "paced (rate set by --paced-rate)",
    }
    bars = [(kinds.get(s["name"], s["name"]), s["tasks_per_s"], "tab:blue") for s in scenarios] + [
        ("baseline: fetch one", fetch_one, "tab:gray"),
        ("baseline: batch 100", doc["baseline"]["batch_100_tasks_per_s"], "tab:gray"),
        ("db ceiling (COPY)", doc["db_ceiling_tasks_per_s"], "dimgray"),
    ]
    labels = [b[0] for b in bars][::-1]
    values = [b[1] for b in bars][::-1]
    top.barh(labels, values, color=[b[2] for b in bars][::-1])
    top.set_xscale("log")
    top.set_xlim(min(values) / 2, max(values) * 6)
    for y, v in enumerate(values):
        top.text(v * 1.08, y, f"{v:,.0f}/s  ({v / fetch_one:.1f}x fetch-one)", va="center", fontsize=9)
    top.set_xlabel("tasks per second (log scale); Conduit blue, plain PostgreSQL grey")
    top.set_title("Throughput per scenario against the plain SKIP LOCKED queue", fontsize=11)

    colours = ["#9ecae1", "#4292c6", "#08519c", "#08306b"]
    width = 0.2
    for j, k in enumerate(LATENCIES):
        xs = [i + (j - 1.5) * width for i in range(len(scenarios))]
        bottom.bar(
            xs, [s["start_latency_ms"][k] for s in scenarios], width, color=colours[j], label=f"start {k}"
        )
        bottom.scatter(
            xs,
            [s["complete_latency_ms"][k] for s in scenarios],
            marker="_",
            s=180,
            color="tab:red",
            zorder=3,
            label="complete (same percentile)" if j == 0 else None,
        )
    bottom.set_yscale("log")
    bottom.set_xticks(range(len(scenarios)), [s["name"] for s in scenarios])
    bottom.set_ylabel("milliseconds (log scale)")
    bottom.set_title(
        "Latency percentiles: submit to start (bars), submit to complete (red ticks)", fontsize=11
    )
    bottom.grid(axis="y", which="major", alpha=0.3)
    bottom.legend(fontsize=8, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    if paced:
        paced_plot(axes[2], paced)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paced_plot(ax: Any, p: dict[str, Any]) -> None:
    """One line per paced worker: its completions per window over its fair share, over time."""
    window = p["window_s"]
    for w in p["per_worker"]:
        xs = [window * (k + 0.5) for k in range(len(w["windows"]))]
        ax.plot(xs, w["windows"], marker="o", ms=3, label=f"worker {w['worker']} (pid {w['pid']})")
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="fair share")
    ax.axhline(p["stalled_below"], color="tab:red", ls=":", lw=1, label="stalled below")
    top = max(x for w in p["per_worker"] for x in w["windows"])
    ax.set_ylim(0, max(1.25, top * 1.1))
    ax.set_xlabel("seconds since the first batch")
    ax.set_ylabel("completions / fair share")
    ax.set_title(
        f"paced: each worker's completions per {window:.0f}-s window over its fair share "
        f"({p['fair_share_per_s']:,.0f}/s)\n{p['not_done']:,} of {p['offered_tasks']:,} tasks not done "
        f"{p['not_done_after_s']:.0f} s after the last submit",
        fontsize=11,
    )
    ax.legend(fontsize=8, ncols=6, loc="upper center", bbox_to_anchor=(0.5, -0.15))


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Sizes: defaults about three minutes, --quick under two."
    )
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: CONDUIT_DSN, else the embedded server)")
    parser.add_argument(
        "--quick", action="store_true", help="every scenario at a small size, backlog 100,000"
    )
    parser.add_argument(
        "--tasks", type=int, metavar="N", help="tasks in each burst: burst, deep_backlog, mesh_N (60,000)"
    )
    parser.add_argument(
        "--payload-bytes", type=int, metavar="N", default=64, help="payload of every task (64)"
    )
    parser.add_argument("--producers", type=int, metavar="N", default=4, help="producer threads (4)")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=2,
        help="worker processes, Conduit's and the baseline's (2)",
    )
    parser.add_argument(
        "--concurrency", type=int, metavar="N", default=8, help="handlers at once in a Conduit worker (8)"
    )
    parser.add_argument(
        "--brokers", default="1,2,3", metavar="N,N,...", help="broker counts of the mesh scenarios (1,2,3)"
    )
    parser.add_argument(
        "--batch", type=int, metavar="N", default=500, help="tasks per submit in a burst (500)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        metavar="N",
        default=500,
        help="tasks a Conduit worker holds beyond its running ones (500)",
    )
    parser.add_argument(
        "--backlog", type=int, metavar="N", help="pending tasks in the deep_backlog table (1,000,000)"
    )
    parser.add_argument(
        "--drain-tasks", type=int, metavar="N", help="drain: tasks pending before the workers start (--tasks)"
    )
    parser.add_argument("--single", type=int, metavar="N", help="one-at-a-time tasks in sync_match (500)")
    parser.add_argument("--rate", type=float, metavar="N", help="steady: tasks offered a second in all (800)")
    parser.add_argument("--steady-seconds", type=float, metavar="N", help="steady: how long (10)")
    parser.add_argument(
        "--steady-producers",
        type=int,
        metavar="N",
        default=16,
        help="steady: threads submitting one task at a time (16)",
    )
    parser.add_argument(
        "--paced-rate", type=float, metavar="N", default=600.0, help="paced: tasks offered a second (600)"
    )
    parser.add_argument(
        "--paced-batch", type=int, metavar="N", default=300, help="paced: tasks per submit (300)"
    )
    parser.add_argument("--paced-seconds", type=float, metavar="N", help="paced: how long (20)")
    parser.add_argument(
        "--paced-workers", type=int, metavar="N", default=3, help="paced: worker processes (3)"
    )
    parser.add_argument(
        "--paced-concurrency",
        type=int,
        metavar="N",
        default=4,
        help="paced: handlers at once in a worker, and tasks prefetched (4)",
    )
    parser.add_argument(
        "--baseline-tasks",
        type=int,
        metavar="N",
        help="fetch-one baseline tasks; x10 for batch-100, x20 for the ceiling (10,000)",
    )
    parser.add_argument(
        "--curve",
        action="store_true",
        help="only the burst, and the same burst with CURVE on every socket (burst_curve), and its cost",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="only the burst, without and with the broker serving /metrics scraped every second, "
        "alternating; prints the ratio (bench/metrics_cost.py)",
    )
    parser.add_argument("--rounds", type=int, metavar="N", default=3, help="--metrics: rounds of each (3)")
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="write the figures to FILE as one JSON object"
    )
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="draw the figures into FILE.png (needs matplotlib)"
    )
    args = parser.parse_args(argv)
    sizes = {
        k: v if (v := getattr(args, k)) is not None else (QUICK if args.quick else FULL)[k] for k in FULL
    }
    try:
        brokers = [int(b) for b in args.brokers.split(",")]
    except ValueError:
        parser.error(f"--brokers takes counts like 1,2,3, not {args.brokers!r}")
    for name, value in [
        ("producers", args.producers),
        ("steady-producers", args.steady_producers),
        ("workers", args.workers),
        ("batch", args.batch),
        ("paced-batch", args.paced_batch),
        ("paced-workers", args.paced_workers),
        ("paced-concurrency", args.paced_concurrency),
    ]:
        if value < 1:
            parser.error(f"--{name} must be at least 1")
    drain_tasks = int(sizes["tasks"] if args.drain_tasks is None else args.drain_tasks)
    if min(brokers) < 1 or min(sizes["tasks"], drain_tasks) < 1 or sizes["rate"] <= 0 or args.concurrency < 1:
        parser.error("broker counts, --tasks, --drain-tasks, --rate and --concurrency must be positive")
    if args.paced_rate <= 0 or sizes["paced_seconds"] <= 0:
        parser.error("--paced-rate and --paced-seconds must be positive")
    plan = Plan(
        payload=b"x" * args.payload_bytes,
        producers=args.producers,
        steady_producers=args.steady_producers,
        workers=args.workers,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        brokers=brokers,
        batch=args.batch,
        paced_rate=args.paced_rate,
        paced_batch=args.paced_batch,
        paced_workers=args.paced_workers,
        paced_concurrency=args.paced_concurrency,
        drain_tasks=drain_tasks,
        curve=args.curve,
        **sizes,
    )
    return args, plan


def main() -> None:
    args, plan = parse()
    if args.plot:  # fail now, not after the run
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("error: --plot needs matplotlib: pip install matplotlib (or Conduit's `bench` extra)")

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # `timeout` and kill: clean up as on Ctrl-C
    began = time.monotonic()
    try:
        dsn = dsn_for(Settings.load(dsn=args.dsn))
        if args.metrics:
            cost = metrics_run(dsn, plan, max(1, args.rounds))
            print(metrics_cost.table(cost, plan.tasks, max(1, args.rounds)))
            if args.json:
                args.json.write_text(json.dumps(cost, indent=2) + "\n")
            return
        measured = run(dsn, plan)
    except (ConduitError, click.ClickException) as exc:
        sys.exit(f"error: {exc}")
    except psycopg.Error as exc:
        sys.exit(f"error: PostgreSQL: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted: every process stopped and every schema dropped")
    doc = document(measured)
    print(table(doc, measured, plan))
    progress(f"total {time.monotonic() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if args.plot:
        plot(args.plot, doc)


if __name__ == "__main__":
    main()
