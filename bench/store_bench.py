"""Store micro-benchmark: Conduit's batched store path against a plain SKIP LOCKED queue, same run.

    python bench/store_bench.py [--dsn DSN] [--tasks N] [--batch 500] [--workers 4] [--json FILE]

Conduit: one process enqueues a batch, leases it, completes it (three durable commits a batch),
and a two-process variant runs a producer and a consumer at once. Baseline: a plain table drained
by worker processes that fetch one task per transaction and ack it in another. Figures are
tasks/s, and Conduit's as a ratio to the baseline measured seconds before on the same server.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import uuid
from pathlib import Path

from baseline import connect, plain_queue
from psycopg import sql

from conduit.config import Settings
from conduit.store import Store, dsn_for, init_schema
from conduit.task import Completion, TaskSpec

PAYLOAD = b"x" * 64


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def conduit_cycle(dsn: str, schema: str, tasks: int, batch: int) -> float:
    """Enqueue a batch, lease it, complete it: the store's whole durable path, one process."""
    with Store.open(dsn, schema=schema) as store:
        owner = store.acquire_broker(f"bench-{uuid.uuid4().hex[:6]}", "bench", 600)
        began = time.perf_counter()
        for _ in range(tasks // batch):
            store.enqueue([TaskSpec("cycle", PAYLOAD)] * batch)
            leased = store.lease(owner, "cycle", batch)
            outcomes = store.complete([Completion(t.id, t.attempt) for t in leased])
            assert len(outcomes) == batch and all(o == "ok" for o in outcomes)
        return (tasks // batch * batch) / (time.perf_counter() - began)


def producer(dsn: str, schema: str, tasks: int, batch: int) -> None:
    with Store.open(dsn, schema=schema) as store:
        for _ in range(tasks // batch):
            store.enqueue([TaskSpec("pipe", PAYLOAD)] * batch)


def consumer(dsn: str, schema: str, tasks: int, batch: int) -> None:
    with Store.open(dsn, schema=schema) as store:
        owner = store.acquire_broker(f"bench-{uuid.uuid4().hex[:6]}", "bench", 600)
        done = 0
        while done < tasks // batch * batch:
            leased = store.lease(owner, "pipe", batch)
            if not leased:
                time.sleep(0.001)
                continue
            store.complete([Completion(t.id, t.attempt) for t in leased])
            done += len(leased)


def conduit_pipeline(dsn: str, schema: str, tasks: int, batch: int) -> float:
    """A producer and a consumer process at once, as a broker's writer and reader would run."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=f, args=(dsn, schema, tasks, batch)) for f in (producer, consumer)]
    began = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs), "a benchmark process failed"
    return (tasks // batch * batch) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: CONDUIT_DSN, else the embedded server)")
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks through Conduit per variant")
    parser.add_argument("--baseline-tasks", type=int, default=20_000, help="tasks the baseline drains")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4, help="baseline worker processes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    dsn = dsn_for(Settings.load(dsn=args.dsn))
    schema = f"bench_{os.getpid()}"
    init_schema(dsn, schema)
    try:
        with connect(dsn, "public") as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            fsync = conn.execute("SHOW fsync").fetchone()[0]
        progress(f"PostgreSQL {version}, fsync={fsync}, {os.cpu_count()} cores")
        progress(
            f"baseline: {args.workers} processes drain {args.baseline_tasks} tasks, fetch one / ack one ..."
        )
        baseline = plain_queue(dsn, schema, args.baseline_tasks, args.workers, 1, PAYLOAD)
        progress(
            f"conduit: enqueue+lease+complete {args.tasks} tasks in batches of {args.batch}, one process ..."
        )
        cycle = conduit_cycle(dsn, schema, args.tasks, args.batch)
        progress("conduit: the same with a producer and a consumer process ...")
        pipeline = conduit_pipeline(dsn, schema, args.tasks, args.batch)
    finally:
        with connect(dsn, "public") as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))

    rows = [
        ("plain SKIP LOCKED, fetch one / ack one", baseline),
        (f"conduit store, batch {args.batch}, one process", cycle),
        (f"conduit store, batch {args.batch}, producer + consumer", pipeline),
    ]
    print(f"{'path':<52}{'tasks/s':>12}{'x baseline':>12}")
    for name, rate in rows:
        print(f"{name:<52}{rate:>12,.0f}{rate / baseline:>12.1f}")
    if args.json:
        figures = {"postgres": version, "fsync": fsync, "cores": os.cpu_count(), "batch": args.batch}
        figures |= {
            "baseline_tasks_per_s": baseline,
            "cycle_tasks_per_s": cycle,
            "pipeline_tasks_per_s": pipeline,
        }
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
