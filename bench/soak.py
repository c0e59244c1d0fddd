"""Soak: millions of tasks through the burst path, with vacuum blocked for a while in the middle.

    python bench/soak.py [--dsn DSN] [--tasks 10000000] [--hold-seconds 120] [--json FILE] [options]

Producer threads submit batches through one Client (at most --in-flight tasks unfinished), demo
workers run them, one broker (its own flags from --broker-arg, e.g. its retention) in a schema of
its own, as bench/throughput.py's burst does. For --hold-seconds around the middle of the run a
separate connection holds a transaction with an assigned XID, so that vacuum can remove nothing:
the worst case for a queue table. Every --interval seconds, and at the end, it prints the tasks
done, the throughput of the last interval, the size of the live `tasks` table (its partitions
too) and its indexes, and the dead tuples of the schema's tables. It ends with the throughput of
the first --segment tasks against the last (pass: the last at least 0.9 of the first) and the
live table and indexes at the end (pass: under 100 MB). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from bisect import bisect_left
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import psycopg
import throughput
from walstats import WriteMeter

from conduit import demo
from conduit.client import Client
from conduit.config import Settings
from conduit.errors import ConduitError
from conduit.store import Store, dsn_for
from conduit.task import TaskSpec

MB = 1024 * 1024
SIZE_LIMIT = 100 * MB  # the live table and its indexes at the end
SLOWDOWN_LIMIT = 0.9  # the last segment's throughput over the first's, at least
POLL = 0.2  # seconds between reads of the completed count (each compacts the counters: a write)

# The live table and its partitions if it has any (pg_partition_tree lists none of a plain table).
LIVE = """WITH t AS (SELECT to_regclass(format('%%I.tasks', %(schema)s::text)) AS rel),
    live AS (SELECT rel AS relid FROM t WHERE rel IS NOT NULL
             UNION SELECT p.relid FROM t, pg_partition_tree(t.rel) AS p)"""
SIZES = f"""{LIVE} SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint,
    coalesce(sum(pg_relation_size(relid)), 0)::bigint, coalesce(sum(pg_indexes_size(relid)), 0)::bigint
    FROM live"""
DEAD = f"""{LIVE} SELECT relname, n_dead_tup, relid IN (SELECT relid FROM live)
    FROM pg_stat_user_tables WHERE schemaname = %(schema)s"""


class Feed:
    """Producer threads that submit batches while fewer than `in_flight` tasks are unfinished."""

    def __init__(self, client: Client, args: argparse.Namespace) -> None:
        self.client = client
        self.tasks, self.batch, self.in_flight = args.tasks, args.batch, args.in_flight
        self.spec = TaskSpec(demo.QUEUE, b"x" * args.payload_bytes)
        self.claimed = self.done = 0
        self.stopped = False
        self.cond = threading.Condition()

    def start(self, pool: ThreadPoolExecutor, producers: int) -> list[Future[None]]:
        return [pool.submit(self._produce) for _ in range(producers)]

    def _produce(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopped or self.claimed - self.done < self.in_flight)
                n = min(self.batch, self.tasks - self.claimed)
                if self.stopped or n <= 0:
                    return
                self.claimed += n
            self.client.submit_batch(self.spec.queue, [self.spec.payload] * n)

    def update(self, done: int) -> None:
        with self.cond:
            self.done = done
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


class XidHold:
    """A transaction that holds an assigned XID (BEGIN; SELECT txid_current();) until ended, on a
    connection of its own: no row deleted or updated after it began can be vacuumed away."""

    def __init__(self, dsn: str, at: float, done: int) -> None:
        self.conn = psycopg.connect(dsn)  # not autocommit: the first statement opens the transaction
        self.conn.execute("SET idle_in_transaction_session_timeout = 0")
        (self.xid,) = self.conn.execute("SELECT txid_current()").fetchone() or (None,)
        self.began, self.done_at_start = at, done
        self.ended: float | None = None
        self.done_at_end = 0

    def end(self, at: float, done: int) -> None:
        self.conn.commit()
        self.conn.close()
        self.ended, self.done_at_end = at, done

    def report(self) -> dict[str, Any]:
        return {
            "xid": self.xid,
            "began_s": round(self.began, 1),
            "ended_s": round(self.ended, 1) if self.ended is not None else None,
            "seconds": round((self.ended or self.began) - self.began, 1),
            "done_at_start": self.done_at_start,
            "done_at_end": self.done_at_end,
        }


def sample(
    conn: psycopg.Connection[Any], schema: str, t: float, done: int, rate: float, held: bool
) -> dict[str, Any]:
    total, heap, indexes = conn.execute(SIZES, {"schema": schema}).fetchone() or (0, 0, 0)
    conn.execute("SELECT pg_stat_clear_snapshot()")
    dead = {name: (n, live) for name, n, live in conn.execute(DEAD, {"schema": schema})}
    return {
        "t_s": round(t, 1),
        "done": done,
        "interval_tasks_per_s": round(rate, 1),
        "tasks_total_bytes": total,
        "tasks_heap_bytes": heap,
        "tasks_index_bytes": indexes,
        "dead_tuples_tasks": sum(n for n, live in dead.values() if live),
        "dead_tuples": {name: n for name, (n, _) in sorted(dead.items())},
        "xid_held": held,
    }


HEADER = (
    f"{'t s':>7}{'done':>12}{'tasks/s':>10}{'tasks MB':>10}{'heap':>8}{'indexes':>9}"
    f"{'dead: tasks':>13}{'all':>11}  xid"
)


def line(s: dict[str, Any]) -> str:
    sizes = (s["tasks_total_bytes"] / MB, s["tasks_heap_bytes"] / MB, s["tasks_index_bytes"] / MB)
    dead = (s["dead_tuples_tasks"], sum(s["dead_tuples"].values()))
    return (
        f"{s['t_s']:>7.0f}{s['done']:>12,}{s['interval_tasks_per_s']:>10,.0f}"
        f"{sizes[0]:>10.1f}{sizes[1]:>8.1f}{sizes[2]:>9.1f}{dead[0]:>13,}{dead[1]:>11,}"
        f"  {'held' if s['xid_held'] else ''}"
    )


def crossing(timeline: list[tuple[float, int]], done: int) -> float:
    """When the completed count reached `done`, interpolated between two reads."""
    counts = [d for _, d in timeline]
    k = bisect_left(counts, done)
    if k == 0:
        return timeline[0][0]
    (t0, d0), (t1, d1) = timeline[k - 1], timeline[min(k, len(timeline) - 1)]
    return t1 if d1 == d0 else t0 + (t1 - t0) * (done - d0) / (d1 - d0)


class Watch:
    """The run's monitor: reads the completed count every POLL s and paces the feed with it,
    holds the XID around the middle, and samples sizes and dead tuples every interval."""

    def __init__(self, dsn: str, schema: str, args: argparse.Namespace) -> None:
        self.dsn, self.schema, self.args = dsn, schema, args
        self.timeline: list[tuple[float, int]] = [(0.0, 0)]  # (seconds since the first submit, done)
        self.samples: list[dict[str, Any]] = []
        self.hold: XidHold | None = None

    @property
    def held(self) -> bool:
        return self.hold is not None and self.hold.ended is None

    def run(
        self, store: Store, conn: psycopg.Connection[Any], feed: Feed, producers: list[Future[None]]
    ) -> None:
        began, tasks = time.monotonic(), self.args.tasks
        last_t, last_done = 0.0, 0
        print(HEADER, flush=True)
        while self.timeline[-1][1] < tasks:
            time.sleep(POLL)
            t, done = time.monotonic() - began, demo._completed(store)
            self.timeline.append((t, done))
            feed.update(done)
            for f in producers:
                if f.done() and (exc := f.exception()):
                    raise exc
            self._hold(t, done)
            if t - last_t >= self.args.interval or done >= tasks:
                rate = (done - last_done) / (t - last_t)
                self.samples.append(sample(conn, self.schema, t, done, rate, self.held))
                print(line(self.samples[-1]), flush=True)
                last_t, last_done = t, done

    def _hold(self, t: float, done: int) -> None:
        """Begin when the tasks left for after the window's middle are half the run's (at the
        rate so far); end after hold_seconds, or with the last task."""
        tasks, seconds = self.args.tasks, self.args.hold_seconds
        if self.hold is None and tasks / 2 - done / t * seconds / 2 <= done < tasks:
            self.hold = XidHold(self.dsn, t, done)
            throughput.progress(f"  holding XID {self.hold.xid} from {t:.0f} s, {done:,} done")
        elif self.hold and self.held and (t - self.hold.began >= seconds or done >= tasks):
            self.hold.end(t, done)
            throughput.progress(f"  XID released at {t:.0f} s, {done:,} done")

    def close(self) -> None:
        if self.hold and self.held:
            self.hold.conn.close()  # an error ended the run: roll back


def soak(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    schema = f"bench_{os.getpid()}_soak"
    workers = throughput.Workers("conduit.demo:worker", args.workers, args.concurrency, args.prefetch)
    watch = Watch(dsn, schema, args)
    with throughput.scratch_schema(dsn, schema), WriteMeter(dsn, schema) as writes:
        throughput.checkpoint(dsn)
        cluster = throughput.BenchCluster(dsn, schema, workers, 1, broker_args=args.broker_arg)
        try:
            gossip = throughput.gossip_endpoints(cluster.endpoints)
            with (
                Client(cluster.endpoints, gossip=gossip) as client,
                Store.open(dsn, schema=schema) as store,
                psycopg.connect(dsn, autocommit=True) as conn,
                ThreadPoolExecutor(args.producers) as pool,
            ):
                throughput.wait_ready(client, 1, workers.count)
                feed = Feed(client, args)
                try:
                    watch.run(store, conn, feed, feed.start(pool, args.producers))
                finally:
                    feed.stop()
        finally:
            watch.close()
            cluster.close()
    return summary(args, watch.timeline, watch.samples, watch.hold, writes.writes.per_task(args.tasks))


def summary(
    args: argparse.Namespace,
    timeline: list[tuple[float, int]],
    samples: list[dict[str, Any]],
    hold: XidHold | None,
    writes: dict[str, Any],
) -> dict[str, Any]:
    segment = min(args.segment, args.tasks // 4) or args.tasks
    first = segment / crossing(timeline, segment)
    last = segment / (crossing(timeline, args.tasks) - crossing(timeline, args.tasks - segment))
    final = samples[-1]["tasks_total_bytes"]
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tasks": args.tasks,
        "seconds": round(timeline[-1][0], 1),
        "segment": segment,
        "first_segment_tasks_per_s": round(first, 1),
        "last_segment_tasks_per_s": round(last, 1),
        "last_over_first": round(last / first, 3),
        "throughput_pass": last / first >= SLOWDOWN_LIMIT,
        "final_tasks_total_bytes": final,
        "size_pass": final < SIZE_LIMIT,
        "hold": hold.report() if hold else None,
        **writes,
        "samples": samples,
    }


def verdict(doc: dict[str, Any]) -> str:
    ok = lambda passed: "pass" if passed else "FAIL"  # noqa: E731
    seg, hold = doc["segment"], doc["hold"]
    lines = [
        f"{doc['tasks']:,} tasks in {doc['seconds']:.0f} s; "
        f"WAL {doc['wal_bytes_per_task']:,.0f} bytes a task",
        f"first {seg:,}: {doc['first_segment_tasks_per_s']:,.0f} tasks/s; last {seg:,}: "
        f"{doc['last_segment_tasks_per_s']:,.0f} tasks/s; last/first {doc['last_over_first']:.2f} "
        f"({ok(doc['throughput_pass'])}: at least {SLOWDOWN_LIMIT})",
        f"live tasks table and indexes at the end: {doc['final_tasks_total_bytes'] / MB:.1f} MB "
        f"({ok(doc['size_pass'])}: under {SIZE_LIMIT // MB} MB)",
    ]
    if hold:
        lines.append(
            f"XID {hold['xid']} held {hold['seconds']:.0f} s (of {doc['args']['hold_seconds']:.0f} "
            f"asked) from {hold['began_s']:.0f} s, while tasks {hold['done_at_start']:,} to "
            f"{hold['done_at_end']:,} ran"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: CONDUIT_DSN, else the embedded server)")
    add = lambda name, default, text, kind=int: parser.add_argument(  # noqa: E731
        name, type=kind, default=default, metavar="N", help=f"{text} ({default:,})"
    )
    add("--tasks", 10_000_000, "tasks in all")
    add("--hold-seconds", 120.0, "how long the XID is held, around the middle of the run", float)
    add("--interval", 10.0, "seconds between samples", float)
    add("--segment", 1_000_000, "tasks of the first and last segments compared (at most a quarter)")
    add("--batch", 500, "tasks per submit")
    add("--producers", 4, "producer threads")
    add("--in-flight", 50_000, "submitted tasks not yet completed, at most")
    add("--workers", 2, "worker processes")
    add("--concurrency", 8, "handlers at once in a worker")
    add("--prefetch", 500, "tasks a worker holds beyond its running ones")
    add("--payload-bytes", 64, "payload of every task")
    parser.add_argument(
        "--broker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for the broker's command line, repeatable (its retention, say)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    if min(args.tasks, args.batch, args.producers, args.in_flight, args.workers, args.segment) < 1:
        parser.error("--tasks, --batch, --producers, --in-flight, --workers and --segment must be positive")
    if args.interval <= 0 or args.hold_seconds < 0:
        parser.error("--interval must be positive and --hold-seconds not negative")
    return args


def main() -> None:
    args = parse()

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        doc = soak(dsn_for(Settings.load(dsn=args.dsn)), args)
    except (ConduitError, click.ClickException) as exc:
        sys.exit(f"error: {exc}")
    except psycopg.Error as exc:
        sys.exit(f"error: PostgreSQL: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted: every process stopped and the schema dropped")
    print(verdict(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
