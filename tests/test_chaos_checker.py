"""The chaos checker must catch what it claims to: a re-execution is explained only by a fault
that could have caused it (while the earlier run was in hand, on its process or the mesh), and
an injection that hit nothing is not counted as a fault."""

from __future__ import annotations

import random
from pathlib import Path

import psycopg
import pytest
from chaos.cluster import Cluster
from chaos.faults import Fault, Scheduler
from chaos.invariants import AFTERMATH, LEASE_TERM, _cause
from chaos.ledger import Execution
from conftest import Database

T = 1_000_000.0  # an arbitrary wall clock
W1, W2 = 101, 202  # worker pids
FIRST = Execution(task=1, attempt=1, pid=W1, start=T, broker="b1", end=T + 0.05, outcome="ok")
AGAIN = Execution(task=1, attempt=2, pid=W2, start=T + 8.0, broker="b2")


def fault(kind: str, start: float, end: float, *pids: int) -> Fault:
    return Fault(kind, "x", start, end, list(pids))


def test_a_failure_on_purpose_explains_only_the_run_after_it() -> None:
    failed = Execution(1, 1, W1, T, "b1", T + 0.05, "fail")
    assert _cause(failed, AGAIN, []) == "handler_failure"
    # The run before this one succeeded: the older failure explains nothing.
    assert _cause(FIRST, AGAIN, []) is None


@pytest.mark.parametrize(
    ("what", "start", "end", "explained"),
    [
        ("paused while it ran", T - 0.5, T + 7.0, True),
        ("paused just after it ended, before its report landed", T + 1.0, T + 2.0, True),
        ("paused long before it started", T - 40.0, T - 35.0, False),
        ("paused long after its report", T + 0.05 + LEASE_TERM + 1, T + 7.5, False),
        ("paused after the run again started", T + 9.0, T + 10.0, False),
    ],
)
def test_a_worker_fault_explains_a_rerun_only_while_the_earlier_run_was_in_hand(
    what: str, start: float, end: float, explained: bool
) -> None:
    cause = _cause(FIRST, AGAIN, [fault("worker_pause", start, end, W1)])
    assert cause == ("worker_pause" if explained else None), what
    # The same fault on a process that ran neither run explains nothing.
    assert _cause(FIRST, AGAIN, [fault("worker_pause", T - 0.5, T + 7.0, 303)]) is None


def test_a_paused_worker_that_runs_a_lost_delivery_late_is_explained_by_its_pause() -> None:
    late = Execution(1, 1, W2, T + 8.0, "b1")  # it held attempt 1 while paused
    assert _cause(FIRST, late, [fault("worker_pause", T - 1.0, T + 7.9, W2)]) == "worker_pause"
    assert _cause(FIRST, late, [fault("worker_pause", T - 30.0, T - 29.0, W2)]) is None


@pytest.mark.parametrize(
    ("what", "start", "end", "explained"),
    [
        ("broker paused while the run was in hand", T + 0.01, T + 6.0, True),
        ("broker fenced a little after a fault before the run", T - AFTERMATH + 1, T - AFTERMATH + 2, True),
        # The old rule took any mesh fault after the task's submit; this one was long before.
        ("broker paused after the submit, long before the run", T - AFTERMATH - 5, T - AFTERMATH - 1, False),
        ("broker paused after the run's report landed", T + 0.05 + LEASE_TERM + 0.5, T + 7.0, False),
    ],
)
def test_a_mesh_fault_explains_a_rerun_only_near_the_earlier_run(
    what: str, start: float, end: float, explained: bool
) -> None:
    cause = _cause(FIRST, AGAIN, [fault("broker_pause", start, end, 999)])
    assert cause == ("broker_pause" if explained else None), what


def test_dropping_connections_that_are_not_there_is_no_fault(db: Database, tmp_path: Path) -> None:
    cluster = Cluster(db.dsn, db.schema, tmp_path, brokers=1, workers=0)  # nothing started
    scheduler = Scheduler(cluster, random.Random(1), postgres=None)
    assert scheduler.db_terminate() is None  # no connection has the mesh's application_name
    with psycopg.connect(db.dsn, application_name=cluster.appname) as victim:
        hit = scheduler.db_terminate()
        assert hit is not None and hit.detail == "1 backends"
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
