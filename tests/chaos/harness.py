"""One chaos run: set up the database and the mesh, load it, inject faults, drain, check.

run.py is the command line around `run`; the pytest test calls the command line, so what CI
proves is what a developer runs."""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from chaos.cluster import Cluster
from chaos.faults import Fault, Scheduler
from chaos.invariants import FINAL, Truth, check
from chaos.ledger import read_ledger
from chaos.load import Producer
from chaos.pg import PrivatePostgres
from conduit.store import describe_dsn

QUEUES = ("chaos.a", "chaos.b")


@dataclass(frozen=True)
class Options:
    duration: float
    seed: int
    dsn: str | None = None
    brokers: int = 3
    workers: int = 3
    concurrency: int = 4
    producers: int = 2
    rate: float = 40.0  # tasks a second over all producers
    drain_timeout: float = 300.0
    rss_limit_mb: int = 300
    workdir: Path | None = None  # keep logs and ledger there (default: a temporary folder, removed)


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


def _unfinished(cluster: Cluster, ids: list[int]) -> int | None:
    """How many of `ids` are not final yet; None while the database cannot be asked."""
    try:
        with cluster.connect("checker") as conn:
            (done,) = conn.execute(
                "SELECT count(*) FROM results WHERE id = ANY(%s) AND state = ANY(%s)", (ids, list(FINAL))
            ).fetchone()  # type: ignore[misc]
    except psycopg.Error:
        return None
    return len(ids) - int(done)


def run(opts: Options, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the chaos; return the summary (with "violations" and "ok")."""
    folder = opts.workdir or Path(tempfile.mkdtemp(prefix="conduit-chaos-"))
    folder.mkdir(parents=True, exist_ok=True)
    postgres: PrivatePostgres | None = None
    if opts.dsn:
        dsn, schema, backend = opts.dsn, f"chaos_{uuid.uuid4().hex[:10]}", f"server {describe_dsn(opts.dsn)}"
    else:
        (folder / "pg").mkdir(exist_ok=True)
        postgres = PrivatePostgres(folder / "pg")
        dsn, schema, backend = postgres.dsn, "conduit", "embedded (private, restartable)"
    progress(f"chaos: seed {opts.seed}, {opts.duration:g}s, {backend}, schema {schema}, folder {folder}")
    cluster: Cluster | None = None
    keep = opts.workdir is not None
    try:
        Cluster.prepare(dsn, schema)
        cluster = Cluster(
            dsn,
            schema,
            folder,
            brokers=opts.brokers,
            workers=opts.workers,
            concurrency=opts.concurrency,
            queues=QUEUES,
        )
        cluster.start_all()
        monitor = _Monitor(cluster)
        monitor.start()
        producers = [
            Producer(
                f"p{i}",
                cluster.endpoints,
                random.Random(f"{opts.seed}-p{i}"),
                opts.rate / opts.producers,
                QUEUES,
            )
            for i in range(opts.producers)
        ]
        scheduler = Scheduler(
            cluster, random.Random(f"{opts.seed}-faults"), postgres=postgres, progress=progress
        )
        for p in producers:
            p.start()
        scheduler.start()
        began, t0 = time.monotonic(), time.time()
        while (left := opts.duration - (time.monotonic() - began)) > 0:
            time.sleep(min(10.0, left))
            acked = sum(t.id is not None for p in producers for t in p.tasks)
            progress(
                f"t={time.monotonic() - began:4.0f}s acknowledged {acked}, faults {len(scheduler.faults)}"
            )
        progress("chaos: fault phase over; recovering the last fault and stopping the producers")
        scheduler.stop()
        for p in producers:
            p.stop()
        tasks = [t for p in producers for t in p.tasks]

        # Drain: every acknowledged task (and any committed without an ack) must end.
        with cluster.connect("checker") as conn:
            keys = {k: i for k, i in conn.execute("SELECT key, task_id FROM idempotency_keys")}
        ids = [t.id if t.id is not None else keys[t.key] for t in tasks if t.id is not None or t.key in keys]
        drain_began = time.monotonic()
        left_over = _unfinished(cluster, ids)
        while left_over != 0 and time.monotonic() - drain_began < opts.drain_timeout:
            progress(f"chaos: draining, {left_over} tasks not finished yet")
            time.sleep(2.0)
            left_over = _unfinished(cluster, ids)
        drained = time.monotonic() - drain_began
        progress(f"chaos: drained in {drained:.1f}s; stopping the mesh")
        monitor.stop()
        exit_codes = cluster.stop_all()

        with cluster.connect("checker") as conn:
            truth = Truth.read(conn)
        runs = read_ledger(cluster.ledger_dir)
        verdict = check(
            tasks,
            truth,
            runs,
            # A crash (itself a violation) also explains the re-executions that follow it.
            [
                *scheduler.faults,
                *(Fault("crash", n, at, at, [pid]) for at, n, pid, _ in cluster.unexpected_exits),
            ],
            broker_rss_max_kb=monitor.rss_max_kb,
            rss_limit_kb=opts.rss_limit_mb * 1024,
            unexpected_exits=cluster.unexpected_exits,
        )
        for error in scheduler.errors:
            verdict.violate(f"fault injection failed: {error}")
        for error in monitor.errors:
            verdict.violate(f"restarting a crashed process failed: {error}")
        unstopped = [name for name, code in exit_codes.items() if code is None]
        if unstopped:
            verdict.violate(f"did not stop on SIGTERM within 60 s: {', '.join(unstopped)}")
        summary: dict[str, Any] = {
            "seed": opts.seed,
            "duration_s": opts.duration,
            "backend": backend,
            "brokers": opts.brokers,
            "workers": opts.workers,
            **verdict.counts,
            "faults": scheduler.counts(),
            "faults_total": len(scheduler.faults),
            "faults_skipped": {
                k: "needs a server of the harness's own (no --dsn)" for k in scheduler.skipped
            },
            "re_executions_by_cause": dict(verdict.explained),
            "submit_attempts": sum(p.attempts for p in producers),
            "submit_errors": sum(len(p.failures) for p in producers),
            "drain_s": round(drained, 1),
            "broker_rss_max_mb": {k: round(v / 1024, 1) for k, v in sorted(monitor.rss_max_kb.items())},
            "violations": verdict.violations[:100],
            "violation_count": len(verdict.violations),
            "fault_log": [
                {"kind": f.kind, "target": f.target, "at": round(f.start - t0, 1), "detail": f.detail}
                for f in scheduler.faults
            ],
        }
        summary["ok"] = not verdict.violations
        if not summary["ok"]:
            keep = True  # the logs and the ledger are the evidence
            summary["workdir"] = str(folder)
        return summary
    finally:
        if cluster is not None:
            cluster.kill_all()
        if opts.dsn:
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            except psycopg.Error as exc:
                progress(f"chaos: could not drop schema {schema}: {exc}")
        if postgres is not None:
            postgres.close()
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
