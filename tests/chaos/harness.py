"""One chaos run: set up the database and the mesh, load it, inject faults, drain, check.

run.py is the command line around `run` (random faults) and scenarios.py (fixed schedules); the
pytest tests call the command line, so what CI proves is what a developer runs."""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from netns.hosts import Network
from netns.pgproxy import PgProxy
from psycopg import sql

from chaos.cluster import Cluster
from chaos.faults import Fault, Scheduler
from chaos.invariants import FINAL, Truth, Verdict, check
from chaos.ledger import Execution, read_ledger
from chaos.liveness import longest_gap, longest_gap_outside
from chaos.load import BASE_RATE, Producer, default_batch
from chaos.pg import PrivatePostgres
from conduit.store import describe_dsn

QUEUES = ("chaos.a", "chaos.b")
SLOW_SUBMIT = 1.0  # seconds: submits slower than this are listed in the summary, as evidence
STALL_LIMIT = 3.0  # seconds without a task start while some broker can serve (--netns: bounded)
# Faults during which no broker can serve the load: the database away from every broker, or the
# producers cut off from every broker. Stalls that overlap them are not held to STALL_LIMIT.
NO_BROKER_SERVES = ("pg_restart", "pg_pause", "client_cut")


@dataclass(frozen=True)
class Options:
    duration: float
    seed: int
    dsn: str | None = None
    brokers: int = 3
    workers: int = 3
    concurrency: int = 4
    producers: int = 2
    rate: float = BASE_RATE  # tasks a second offered over all producers
    batch: int | None = None  # the largest submit; None: load.default_batch(rate)
    drain_timeout: float = 300.0
    rss_limit_mb: int = 300
    workdir: Path | None = None  # keep logs and ledger there (default: a temporary folder, removed)
    scenario: str = "random"  # or one of scenarios.SCENARIOS: a fixed schedule instead of `duration`
    netns: bool = False  # hosts in network namespaces, PostgreSQL through a proxy; partitions too


class _Monitor(threading.Thread):
    """Samples broker memory and replaces members that died on their own, every half second."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(name="monitor", daemon=True)
        self.cluster = cluster
        self.rss_max_kb: dict[str, int] = {}
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.5):
            for name, kb in self.cluster.broker_rss_kb().items():
                self.rss_max_kb[name] = max(kb, self.rss_max_kb.get(name, 0))
            try:
                self.cluster.check_alive()
            except Exception as exc:  # a member that cannot be restarted: reported, not hidden
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._halt.set()
        self.join(120)


def _unfinished(cluster: Cluster, ids: list[int]) -> list[int] | None:
    """Those of `ids` not final yet (so each look asks only about what the last one left);
    None while the database cannot be asked."""
    try:
        with cluster.connect("checker") as conn:
            rows = conn.execute(
                "SELECT w.id FROM unnest(%s::bigint[]) AS w(id) WHERE NOT EXISTS "
                "(SELECT 1 FROM results r WHERE r.id = w.id AND r.state = ANY(%s))",
                (ids, list(FINAL)),
            ).fetchall()
    except psycopg.Error:
        return None
    return [task_id for (task_id,) in rows]


class Session:
    """What every chaos run shares: a database (a private server, or a schema of the given one),
    the mesh, its monitor and producers; `audit` checks the invariants, and leaving the `with`
    stops everything started and removes what it made, unless it is evidence of a failure."""

    def __init__(self, opts: Options, progress: Callable[[str], None], *, steady: bool = False) -> None:
        self.opts, self.progress, self.steady = opts, progress, steady
        self.folder = opts.workdir or Path(tempfile.mkdtemp(prefix="conduit-chaos-"))
        self.keep = opts.workdir is not None
        self.postgres: PrivatePostgres | None = None
        self.net: Network | None = None
        self.proxy: PgProxy | None = None
        self.cluster: Cluster | None = None
        self.producers: list[Producer] = []
        self.batch = opts.batch or default_batch(opts.rate)
        if opts.dsn:
            self.dsn, self.schema = opts.dsn, f"chaos_{uuid.uuid4().hex[:10]}"
            self.backend = f"server {describe_dsn(opts.dsn)}"

    def __enter__(self) -> Session:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        opts = self.opts
        self.folder.mkdir(parents=True, exist_ok=True)
        if not opts.dsn:
            (self.folder / "pg").mkdir(exist_ok=True)
            self.postgres = PrivatePostgres(self.folder / "pg")
            self.dsn, self.schema, self.backend = (
                self.postgres.dsn,
                "conduit",
                "embedded (private, restartable)",
            )
        what = opts.scenario if opts.scenario != "random" else f"{opts.duration:g}s of random faults"
        self.progress(
            f"chaos: {what}, seed {opts.seed}, {self.backend}, schema {self.schema}, folder {self.folder}"
        )
        Cluster.prepare(self.dsn, self.schema)
        if opts.netns:
            self.net = Network(brokers=opts.brokers, workers=2, clients=1)
            self.proxy = PgProxy(self.dsn, self.net.db_gateway).start()
            hosts = ", ".join(f"{h.name} {h.address}" for h in self.net.hosts.values())
            self.progress(f"chaos: hosts {hosts}; PostgreSQL at {self.net.db_gateway}:{self.proxy.port}")
        self.cluster = Cluster(
            self.dsn,
            self.schema,
            self.folder,
            brokers=opts.brokers,
            workers=opts.workers,
            concurrency=opts.concurrency,
            queues=QUEUES,
            net=self.net,
            broker_dsn=self.proxy.dsn() if self.proxy else None,
        )
        self.cluster.start_all()
        self.monitor = _Monitor(self.cluster)
        self.monitor.start()
        self.producers = [
            Producer(
                f"p{i}",
                self.cluster.endpoints,
                random.Random(f"{opts.seed}-p{i}"),
                opts.rate / opts.producers,
                QUEUES,
                max_batch=self.batch,
                steady=self.steady,
                work=min(1.0, BASE_RATE / opts.rate),
                place=partial(self.net.enter, "c1") if self.net else nullcontext,
            )
            for i in range(opts.producers)
        ]
        for p in self.producers:
            p.start()

    def mesh(self) -> Cluster:
        assert self.cluster is not None
        return self.cluster

    def warm(self, timeout: float = 120.0) -> float:
        """Wait until every worker has started a task and every producer has had a submit
        acknowledged; returns that wall-clock time. Liveness is measured from here, so process
        start-up and first connections are not counted against the product."""
        cluster = self.mesh()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            started = {r.pid for r in read_ledger(cluster.ledger_dir)}
            if all(w.alive() and w.pid in started for w in cluster.workers) and all(
                p.latencies for p in self.producers
            ):
                return time.time()
            time.sleep(0.2)
        raise RuntimeError(f"the mesh did not warm up within {timeout:g}s; see the logs in {self.folder}")

    def acknowledged(self) -> int:
        return sum(p.acknowledged for p in self.producers)

    def stop_load(self) -> float:
        """Stop the producers; returns when the load ended (wall clock)."""
        for p in self.producers:
            p.stop()
        return time.time()

    def drain(self) -> float:
        """Wait until every acknowledged task (and any committed without an ack) has ended."""
        cluster = self.mesh()
        ids = [n for p in self.producers for n in p.ids if n]
        unacked = [f"{p.label}-{i + 1}" for p in self.producers for i, n in enumerate(p.ids) if not n]
        with cluster.connect("checker") as conn:
            query = "SELECT task_id FROM idempotency_keys WHERE key = ANY(%s)"
            ids += [task_id for (task_id,) in conn.execute(query, (unacked,))]
        began = time.monotonic()
        left_over = _unfinished(cluster, ids)
        while left_over != [] and time.monotonic() - began < self.opts.drain_timeout:
            count = "?" if left_over is None else len(left_over)
            self.progress(f"chaos: draining, {count} tasks not finished yet")
            time.sleep(2.0)
            left_over = _unfinished(cluster, ids if left_over is None else left_over)
        drained = time.monotonic() - began
        self.progress(f"chaos: drained in {drained:.1f}s; stopping the mesh")
        return drained

    def audit(
        self, faults: list[Fault], t0: float, load_end: float
    ) -> tuple[dict[str, Any], Verdict, list[Execution]]:
        """Stop the mesh and check everything; returns the summary so far, the verdict (to which
        a caller may add violations before `conclude`) and the ledger's runs."""
        cluster = self.mesh()
        self.monitor.stop()
        exit_codes = cluster.stop_all()
        with cluster.connect("checker") as conn:
            truth = Truth.read(conn)
        runs = read_ledger(cluster.ledger_dir)
        tasks = [t for p in self.producers for t in p.submitted()]
        verdict = check(
            tasks,
            truth,
            runs,
            # A crash (itself a violation) also explains the re-executions that follow it.
            [*faults, *(Fault("crash", n, at, at, [pid]) for at, n, pid, _ in cluster.unexpected_exits)],
            broker_rss_max_kb=self.monitor.rss_max_kb,
            rss_limit_kb=self.opts.rss_limit_mb * 1024,
            unexpected_exits=cluster.unexpected_exits,
        )
        for error in self.monitor.errors:
            verdict.violate(f"restarting a crashed process failed: {error}")
        unstopped = [name for name, code in exit_codes.items() if code is None]
        if unstopped:
            verdict.violate(f"did not stop on SIGTERM within 60 s: {', '.join(unstopped)}")
        latencies = [b for p in self.producers for b in p.latencies if t0 <= b.sent <= load_end]
        slowest = max(latencies, key=lambda b: b.seconds, default=None)
        measured = max(load_end - t0, 1e-9)
        gap, gap_at = longest_gap((r.start for r in runs), t0, load_end)
        outages = [(f.start, f.end or f.start) for f in faults if f.kind in NO_BROKER_SERVES]
        stall, stall_at = longest_gap_outside((r.start for r in runs), t0, load_end, outages)
        if self.opts.netns and stall > STALL_LIMIT:
            verdict.violate(
                f"no task started for {stall:.2f} s from t={stall_at - t0:.1f} s while brokers could serve"
            )
        summary: dict[str, Any] = {
            "scenario": self.opts.scenario,
            "seed": self.opts.seed,
            "backend": self.backend,
            "brokers": self.opts.brokers,
            "workers": self.opts.workers,
            **verdict.counts,
            "re_executions_by_cause": dict(verdict.explained),
            "submit_attempts": sum(p.attempts for p in self.producers),
            "submit_errors": sum(len(p.failures) for p in self.producers),
            "broker_rss_max_mb": {k: round(v / 1024, 1) for k, v in sorted(self.monitor.rss_max_kb.items())},
            # Measured from the warm mesh (t0; the logs' clock is UTC) to the end of the load, in
            # seconds after t0.
            "t0_utc": datetime.fromtimestamp(t0, UTC).isoformat(timespec="milliseconds"),
            "measured_s": round(load_end - t0, 1),
            # Rates over the measured window: tasks first tried, acknowledged, and runs that ended.
            "rate_target": self.opts.rate,
            "batch_max": self.batch,
            "offered_per_s": round(sum(t0 <= t.sent <= load_end for t in tasks) / measured, 1),
            "acknowledged_per_s": round(sum(b.tasks for b in latencies) / measured, 1),
            "ran_per_s": round(
                sum(r.end is not None and t0 <= r.end <= load_end for r in runs) / measured, 1
            ),
            "max_submit_latency_s": round(slowest.seconds, 3) if slowest else None,
            "max_submit_latency_at": round(slowest.sent - t0, 1) if slowest else None,
            "slow_submits": [
                {"producer": b.producer, "at": round(b.sent - t0, 3), "seconds": round(b.seconds, 3)}
                for b in sorted(latencies, key=lambda b: b.sent)
                if b.seconds > SLOW_SUBMIT
            ],
            "longest_start_gap_s": round(gap, 3),
            "longest_start_gap_at": round(gap_at - t0, 1),
            "longest_stall_served_s": round(stall, 3),
            "longest_stall_served_at": round(stall_at - t0, 1),
            "hosts": {h.name: h.address for h in self.net.hosts.values()} if self.net else None,
            "fault_log": [
                {"kind": f.kind, "target": f.target, "at": round(f.start - t0, 1), "detail": f.detail}
                for f in faults
            ],
        }
        return summary, verdict, runs

    def conclude(self, summary: dict[str, Any], verdict: Verdict) -> dict[str, Any]:
        summary["violations"] = verdict.violations[:100]
        summary["violation_count"] = len(verdict.violations)
        summary["ok"] = not verdict.violations
        if not summary["ok"]:
            self.keep = True  # the logs and the ledger are the evidence
            summary["workdir"] = str(self.folder)
        return summary

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for p in self.producers:
            p.stop()
        if self.cluster is not None:
            self.cluster.kill_all()
        if self.proxy is not None:
            self.proxy.close()
        if self.net is not None:
            self.net.close()
        if self.opts.dsn:
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
                    )
            except psycopg.Error as error:
                self.progress(f"chaos: could not drop schema {self.schema}: {error}")
        if self.postgres is not None:
            self.postgres.close()
        if not self.keep:
            shutil.rmtree(self.folder, ignore_errors=True)


def run(opts: Options, progress: Callable[[str], None]) -> dict[str, Any]:
    """Random faults for `opts.duration` seconds; returns the summary (with "violations", "ok").
    Liveness figures are reported, not bounded: database faults legitimately stall everything."""
    with Session(opts, progress) as session:
        t0 = session.warm()
        scheduler = Scheduler(
            session.mesh(),
            random.Random(f"{opts.seed}-faults"),
            postgres=session.postgres,
            proxy=session.proxy,
            progress=progress,
        )
        scheduler.start()
        began = time.monotonic()
        acknowledged, since = session.acknowledged(), began
        while (left := opts.duration - (time.monotonic() - began)) > 0:
            time.sleep(min(10.0, left))
            now, before, acknowledged = time.monotonic(), acknowledged, session.acknowledged()
            progress(
                f"t={now - began:4.0f}s acknowledged {acknowledged} "
                f"({(acknowledged - before) / (now - since):.0f}/s), faults {len(scheduler.faults)}"
            )
            since = now
        progress("chaos: fault phase over; recovering the last fault and stopping the producers")
        scheduler.stop()
        load_end = session.stop_load()
        drained = session.drain()
        summary, verdict, _ = session.audit(scheduler.faults, t0, load_end)
        for error in scheduler.errors:
            verdict.violate(f"fault injection failed: {error}")
        summary.update(
            duration_s=opts.duration,
            drain_s=round(drained, 1),
            faults=scheduler.counts(),
            faults_total=len(scheduler.faults),
            faults_missed=dict(scheduler.missed),
            faults_skipped={k: "needs a server of the harness's own (no --dsn)" for k in scheduler.skipped},
        )
        return session.conclude(summary, verdict)
