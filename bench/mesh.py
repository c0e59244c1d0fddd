"""Mesh benchmark: the same burst through 1, 2 and 3 brokers on one PostgreSQL.

    python bench/mesh.py [--dsn DSN] [--tasks 20000] [--workers 3] [--brokers 1,2,3] [--json FILE]

One producer (a Client that spreads its submits over the live brokers it hears of in gossip)
submits batches; worker processes, each starting at a different broker, drain them. Figures
are tasks/s and submit-to-start latency percentiles, and each as a ratio to one broker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

from conduit import demo
from conduit.client import Client
from conduit.config import Settings
from conduit.store import Store, dsn_for, init_schema


def run(dsn: str, brokers: int, workers: int, tasks: int, batch: int) -> demo.Figures:
    schema = f"bench_mesh_{os.getpid()}_{brokers}"
    init_schema(dsn, schema)
    cluster = demo.Cluster(dsn, schema, workers, brokers)
    try:
        with (
            Client(cluster.endpoints) as client,
            Store.open(dsn, schema=schema) as store,
        ):
            time.sleep(1.0)  # gossip: let the producer and the workers hear every broker
            return demo.burst(client, store, tasks, batch, producers=1)
    finally:
        cluster.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: CONDUIT_DSN, else the embedded server)")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--workers", type=int, default=3, help="worker processes")
    parser.add_argument("--brokers", default="1,2,3", help="broker counts to compare")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    dsn = dsn_for(Settings.load(dsn=args.dsn))
    results: dict[int, demo.Figures] = {}
    for n in [int(b) for b in args.brokers.split(",")]:
        print(f"{n} broker(s), {args.workers} workers, {args.tasks} tasks ...", file=sys.stderr, flush=True)
        results[n] = run(dsn, n, args.workers, args.tasks, args.batch)
    base = next(iter(results.values()))
    print(f"{'brokers':>8}{'tasks/s':>10}{'x 1st':>8}{'start p50 ms':>14}{'p90':>10}{'p99':>10}{'max':>10}")
    for n, f in results.items():
        s = f.start_ms
        print(
            f"{n:>8}{f.per_second:>10,.0f}{f.per_second / base.per_second:>8.2f}"
            f"{s['p50']:>14.1f}{s['p90']:>10.1f}{s['p99']:>10.1f}{s['max']:>10.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(demo.report({f"mesh_{n}": f for n, f in results.items()}), indent=2))


if __name__ == "__main__":
    main()
