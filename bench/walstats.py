"""What a benchmark step wrote to PostgreSQL: WAL bytes, and rows by table of its schema.

WAL is the server's write position (`pg_current_wal_lsn()`) before and after the step, so
everything the server wrote in between counts, other sessions' writes too: run on a quiet server.
Rows are `pg_stat_user_tables` counters (inserted, updated, of those HOT, deleted) of every table
in the step's schema, summed whatever the tables are called, partitions included; a table dropped
during the step takes its counts with it, and TRUNCATE counts nothing. PostgreSQL 15's backends
flush those counters at most once a second, an idle one only after 10 s, and a closing one at
once: so a reading waits until they have stopped moving for a second, and the reading after a
step is to be taken once the step's connections are closed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

COUNTERS = ("inserted", "updated", "hot_updated", "deleted")
ROWS = """SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del
    FROM pg_stat_user_tables WHERE schemaname = %s"""
WAL = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"
QUIET = 1.0  # seconds the counters must stand still before a reading counts
SETTLE_TIMEOUT = 15.0  # a reading taken anyway after this long (an idle backend flushes by 10 s)

Rows = dict[str, dict[str, int]]  # table -> counter -> rows


@dataclass(frozen=True)
class Writes:
    wal_bytes: int
    tables: Rows  # rows written per table during the step

    def totals(self) -> dict[str, int]:
        return {c: sum(t[c] for t in self.tables.values()) for c in COUNTERS}

    def per_task(self, tasks: int) -> dict[str, Any]:
        """The JSON figures: WAL bytes and rows per task, and the raw rows of each table."""
        n = max(1, tasks)
        return {
            "wal_bytes_per_task": round(self.wal_bytes / n, 1),
            "rows_per_task": {c: round(v / n, 3) for c, v in self.totals().items()},
            "rows_by_table": {name: t for name, t in sorted(self.tables.items()) if any(t.values())},
        }


def _rows(conn: psycopg.Connection[Any], schema: str) -> Rows:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return {name: dict(zip(COUNTERS, counts, strict=True)) for name, *counts in conn.execute(ROWS, (schema,))}


def settled_rows(conn: psycopg.Connection[Any], schema: str) -> Rows:
    """The schema's row counters once they have stood still for QUIET seconds."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last, since = _rows(conn, schema), time.monotonic()
    while time.monotonic() - since < QUIET and time.monotonic() < deadline:
        time.sleep(0.1)
        if (now := _rows(conn, schema)) != last:
            last, since = now, time.monotonic()
    return last


class WriteMeter:
    """WAL and rows written while in use, in `schema`. Leave it after the step's own connections
    (brokers, workers, producers) are closed, so that their counters have been flushed."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.writes = Writes(0, {})

    def _read(self) -> tuple[int, Rows]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = settled_rows(conn, self.schema)
            (wal,) = conn.execute(WAL).fetchone() or (0,)
        return int(wal), rows

    def __enter__(self) -> WriteMeter:
        self._wal, self._rows = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return  # the step failed: its figures mean nothing, and the error matters more
        wal, rows = self._read()
        zero = dict.fromkeys(COUNTERS, 0)
        tables = {
            name: {c: t[c] - self._rows.get(name, zero)[c] for c in COUNTERS} for name, t in rows.items()
        }
        self.writes = Writes(wal - self._wal, tables)
