"""The Python Worker against the Node.js reference worker (clients/node), same setup, same run.

    python bench/workers.py [--dsn DSN] [--tasks 20000] [--concurrency 16] [--prefetch 500] [--rounds 2]

One broker, one worker process, tiny tasks (a 16-byte payload, a handler that returns nothing),
two shapes per round and implementation, each on a fresh schema:
- burst: the worker idles on the queue, then 2 producer threads submit `--tasks` in batches of
  500 as fast as commits allow; throughput is tasks / (last finish - first submit), database clock.
- drain: `--tasks` are already pending when the worker starts; tasks / (last finish - first
  finish), so the worker's start-up is not counted.
Also the worker process's CPU time per task (start-up included), which the load of a shared
machine blurs less than throughput.
Implementations alternate within each round, so drift on the shared machine hits both alike.
Both run the conformance handlers (tests/conformance) with heartbeats every 2.5 s and 5 s polls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from psycopg import sql

from conduit import demo
from conduit.client import Client
from conduit.config import Settings
from conduit.store import dsn_for, init_schema
from conduit.task import TaskSpec

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "noop"


def worker_command(
    impl: str, endpoint: str, concurrency: int, prefetch: int
) -> tuple[list[str], dict[str, str]]:
    env = {
        **os.environ,
        "CONDUIT_TEST_ENDPOINT": endpoint,
        "CONDUIT_TEST_CONCURRENCY": str(concurrency),
        "CONDUIT_TEST_PREFETCH": str(prefetch),
        "CONDUIT_TEST_HEARTBEAT": "2.5",
        "CONDUIT_TEST_POLL_TIMEOUT": "5",
        "PYTHONPATH": str(ROOT / "tests" / "conformance"),
    }
    env.pop("CONDUIT_TEST_LEDGER", None)
    if impl == "python":
        cmd = [sys.executable, "-m", "conduit", "worker", "handlers:worker", "--log-level", "warning"]
    else:
        cmd = ["node", str(ROOT / "clients" / "node" / "test" / "conformance-worker.js")]
    return cmd, env


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): the worker's own cost per task,
    which a shared machine's load blurs less than throughput."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def finished(conn: psycopg.Connection, schema: str) -> int:
    query = sql.SQL("SELECT count(*) FROM {}.results").format(sql.Identifier(schema))
    return int(conn.execute(query).fetchone()[0])  # type: ignore[index]


def measure(url: str, impl: str, shape: str, args: argparse.Namespace) -> tuple[float, float]:
    """One measurement on a fresh schema with its own broker and worker: tasks per second, and
    the worker process's CPU microseconds per task (start-up included)."""
    schema = f"bench_workers_{uuid.uuid4().hex[:8]}"
    init_schema(url, schema)
    conn = psycopg.connect(url, autocommit=True)
    cluster = demo.Cluster(url, schema, workers=0)  # close() stops the worker before the broker
    try:
        batches = [min(500, args.tasks - i) for i in range(0, args.tasks, 500)]
        with Client(cluster.endpoint, timeout=60, retry_submits=False) as client:

            def submit_all() -> None:
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda n: client.submit_many([TaskSpec(QUEUE, b"x" * 16)] * n), batches))

            worker = worker_command(impl, cluster.endpoint, args.concurrency, args.prefetch)
            began = 0.0  # a drain is timed from its first completion
            if shape == "drain":
                submit_all()
                pid = cluster.add_worker(*worker).pid
            else:
                pid = cluster.add_worker(*worker).pid
                time.sleep(2.0)  # started and polling
                began = time.time()  # the clock of a burst starts with its first submit
                submit_all()
            deadline = time.monotonic() + 600
            while finished(conn, schema) < args.tasks:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{impl} {shape}: not done in 600 s")
                time.sleep(0.1)
        query = "SELECT extract(epoch FROM min(finished_at)), extract(epoch FROM max(finished_at))"
        query += " FROM {}.results"
        first, last = conn.execute(sql.SQL(query).format(sql.Identifier(schema))).fetchone()  # type: ignore[misc]
        seconds = float(last) - (began if shape == "burst" else float(first))
        return args.tasks / seconds, cpu_seconds(pid) / args.tasks * 1e6
    finally:
        cluster.close()
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: CONDUIT_DSN, else the embedded one)")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    url = dsn_for(Settings.load(dsn=args.dsn))
    figures: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for shape in ("burst", "drain"):
            for impl in ("python", "node"):
                rate, us = measure(url, impl, shape, args)
                figures.setdefault(shape, {}).setdefault(impl, []).append(rate)
                cpu.setdefault(shape, {}).setdefault(impl, []).append(us)
                print(f"{shape:<6} {impl:<7} {rate:>9,.0f} tasks/s {us:>6.0f} us CPU/task", file=sys.stderr)
    print(
        f"{args.tasks:,} tasks, 1 broker, 1 worker process, concurrency {args.concurrency}, "
        f"prefetch {args.prefetch}; median of {args.rounds}"
    )
    print(
        f"{'shape':<8}{'python tasks/s':>16}{'node tasks/s':>16}"
        f"{'python µs CPU/task':>20}{'node µs CPU/task':>18}"
    )
    for shape, by in figures.items():
        py, node = statistics.median(by["python"]), statistics.median(by["node"])
        py_cpu, node_cpu = statistics.median(cpu[shape]["python"]), statistics.median(cpu[shape]["node"])
        print(f"{shape:<8}{py:>16,.0f}{node:>16,.0f}{py_cpu:>20.0f}{node_cpu:>18.0f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "tasks_per_s": figures,
                    "cpu_us_per_task": cpu,
                }
            )
        )


if __name__ == "__main__":
    main()
