"""History with retention: finished tasks are dropped a day (partition) at a time once older
than the retention, with their counts and keys; what was pruned reads as unknown."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
from psycopg import sql

from conduit.store import Store
from conduit.task import Completion, TaskSpec


def conduit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conduit", *args], capture_output=True, text=True, timeout=60
    )


def execute(db, statement: str) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(db.schema)))
        conn.execute(statement.encode())


def test_db_prune_drops_old_days_with_their_counts_and_keys(store: Store, db) -> None:
    owner = store.acquire_broker("b1", "tcp://x", 30)
    (recent,) = store.enqueue([TaskSpec("q", b"now", idempotency_key="fresh")])
    (leased,) = store.lease(owner, "q", 1)
    assert store.complete([Completion(leased.id, leased.attempt, b"r")]) == ["ok"]
    # Ten days ago: a day partition of each table, a task completed in a batch and a dead one.
    execute(db, "SELECT ensure_partitions(now() - interval '10 days', 1)")
    execute(
        db,
        "INSERT INTO completions (queue, lo, hi, ids, attempts, finished_at)"
        " VALUES ('q', 900001, 900001, '{900001}', '{1}', now() - interval '10 days')",
    )
    execute(
        db,
        "INSERT INTO history (id, queue, state, attempt, failures, priority, policy, finished_at)"
        " SELECT 900002, 'q', 'dead', 3, 3, 0, min(id), now() - interval '10 days' FROM policies",
    )
    execute(db, "INSERT INTO queue_counts VALUES ('q', 'completed', 1), ('q', 'dead', 1)")
    execute(
        db,
        "INSERT INTO idempotency_keys (queue, key, task_id, created_at)"
        " VALUES ('q', 'stale', 900001, now() - interval '10 days')",
    )
    assert [i.state for i in store.lookup([900001, 900002])] == ["completed", "dead"]
    assert store.queue_stats()["q"] == {"completed": 2, "dead": 1}

    kept = conduit("db", "prune", "--dsn", db.dsn, "--schema", db.schema, "--retention-days", "30", "--json")
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["partitions_dropped"] == 0  # ten days old is within 30

    pruned = conduit("db", "prune", "--dsn", db.dsn, "--schema", db.schema, "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout) == {"retention_days": 7.0, "partitions_dropped": 2, "partitions_made": 0}
    assert [i.state for i in store.lookup([900001, 900002, leased.id])] == [None, None, "completed"]
    assert store.lookup([leased.id])[0].result == b"r"
    assert store.queue_stats()["q"] == {"completed": 1}
    assert db.query("SELECT key FROM idempotency_keys ORDER BY key") == [("fresh",)]
    assert recent.id == leased.id


def test_db_prune_refuses_a_retention_under_a_day(db) -> None:
    proc = conduit("db", "prune", "--dsn", db.dsn, "--schema", db.schema, "--retention-days", "0.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "retention-days" in proc.stderr
