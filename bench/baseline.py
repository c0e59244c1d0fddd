"""What Conduit is judged against, measured in the same run: a plain SKIP LOCKED queue and the
database's own ceiling for durably taking in and finishing rows.

- `plain_queue`: a plain table of jobs (fetch one task a transaction,
  ack it in another), or the same with `batch` tasks per fetch and per ack, drained by worker
  processes that all start together once connected.
- `db_ceiling`: one process COPYs `batch` rows into a plain table (one commit) and deletes them
  by id (a second commit), the least a durable queue must do per task.

Both run in the schema they are given (search_path), with the server's durability settings.
"""

from __future__ import annotations

import multiprocessing
import queue
import sys
import time
from collections.abc import Callable
from typing import Any

import click
import psycopg
from psycopg import sql

# A competitor written the plain way, so its SQL stays here, not in Conduit's queries.
BASELINE_TABLE = (
    "CREATE TABLE jobs (id bigserial PRIMARY KEY, state text NOT NULL DEFAULT 'ready', payload bytea)"
)
BASELINE_FETCH = """UPDATE jobs SET state = 'running' WHERE id = (
    SELECT id FROM jobs WHERE state = 'ready' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id"""
BASELINE_ACK = "DELETE FROM jobs WHERE id = %s"
BATCH_FETCH = """UPDATE jobs SET state = 'running' WHERE id IN (
    SELECT id FROM jobs WHERE state = 'ready' ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id"""
BATCH_ACK = "DELETE FROM jobs WHERE id = ANY(%s)"
CEILING_TABLE = "CREATE TABLE ceiling (id bigint PRIMARY KEY, payload bytea NOT NULL)"


def connect(dsn: str, schema: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    return conn


def _drain(dsn: str, schema: str, batch: int, ready: Any, done: Any, finished: Any) -> None:
    """One baseline worker: connect, wait for the others, drain the table, report when it ended."""
    with connect(dsn, schema) as conn:
        ready.wait(60)
        count = 0
        if batch == 1:
            while row := conn.execute(BASELINE_FETCH).fetchone():
                conn.execute(BASELINE_ACK, row)
                count += 1
                if count % 100 == 0:
                    with done.get_lock():
                        done.value += 100
        else:
            while ids := [r[0] for r in conn.execute(BATCH_FETCH, (batch,)).fetchall()]:
                conn.execute(BATCH_ACK, (ids,))
                count += len(ids)
                with done.get_lock():
                    done.value += len(ids)
        finished.put((count, time.monotonic()))  # CLOCK_MONOTONIC: one clock for every process


def plain_queue(dsn: str, schema: str, tasks: int, workers: int, batch: int, payload: bytes) -> float:
    """Tasks/s of `workers` processes draining `tasks` rows, `batch` per fetch and per ack."""
    with connect(dsn, schema) as conn:
        conn.execute(BASELINE_TABLE)
        with conn.cursor().copy("COPY jobs (payload) FROM STDIN") as copy:
            for _ in range(tasks):
                copy.write_row((payload,))
        conn.execute("VACUUM ANALYZE jobs")
    ctx = multiprocessing.get_context("spawn")
    ready, done, finished = ctx.Barrier(workers + 1), ctx.Value("q", 0), ctx.Queue()
    procs = [
        ctx.Process(target=_drain, args=(dsn, schema, batch, ready, done, finished), daemon=True)
        for _ in range(workers)
    ]
    try:
        for p in procs:
            p.start()
        ready.wait(60)  # every worker connected: the clock starts when they all may begin
        began = time.monotonic()
        label = f"baseline, {'fetch one / ack one' if batch == 1 else f'batches of {batch}'}"
        ends = _watch(label, tasks, lambda: done.value, finished, procs)
        drained = sum(n for n, _ in ends)
        if drained != tasks:
            raise click.ClickException(f"the baseline drained {drained} of {tasks} tasks")
        return tasks / (max(t for _, t in ends) - began)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(10)


def _watch(label: str, total: int, progress: Callable[[], int], finished: Any, procs: list[Any]) -> list[Any]:
    """Progress until every worker reported its end; an error if one died without reporting."""
    ends: list[Any] = []
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        seen = 0
        while len(ends) < len(procs):
            try:
                ends.append(finished.get(timeout=0.1))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise click.ClickException("a baseline worker process died") from None
            now = progress()
            bar.update(now - seen)
            seen = now
    return ends


def db_ceiling(dsn: str, schema: str, rows: int, batch: int, payload: bytes) -> float:
    """Rows/s one process durably inserts (COPY, one commit) and deletes (by id, one commit)."""
    with connect(dsn, schema) as conn:
        conn.execute(CEILING_TABLE)
        began = time.perf_counter()
        with click.progressbar(length=rows, label=f"database ceiling, COPY {batch}", file=sys.stderr) as bar:
            for start in range(0, rows, batch):
                ids = list(range(start, min(rows, start + batch)))
                with conn.transaction(), conn.cursor().copy("COPY ceiling (id, payload) FROM STDIN") as copy:
                    for i in ids:
                        copy.write_row((i, payload))
                conn.execute("DELETE FROM ceiling WHERE id = ANY(%s)", (ids,))
                bar.update(len(ids))
        return rows / (time.perf_counter() - began)
