"""The seed's heartbeat failover: a broker dies while its workers run tasks longer than a
heartbeat; the other broker adopts those deliveries from the workers' heartbeats, so each task
completes once, through the survivor, at the attempt it was delivered with, and none runs again.

The task lease is shorter than the work a worker holds (running plus prefetched), so only
heartbeats through the survivor keep the deliveries alive; a survivor that handed them out again
instead (after the dead broker's lease ran out) would show as a second run or a later attempt."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from test_e2e import ledger_runs, run_starts, spawn_worker, wait_for

from conduit.client import Client
from conduit.task import TaskSpec

CONCURRENCY = 2  # per worker, and as many prefetched (the handlers' Worker: prefetch = concurrency)
WORKERS = 2
TASKS = 2 * CONCURRENCY * WORKERS  # every worker holds all it can: two running, two prefetched
SECONDS = 2.0  # each task's work: four heartbeats of the handlers' Worker (0.5 s)
LEASE = 3.0  # task lease: shorter than a prefetched task is held (about 2 * SECONDS)


def test_tasks_of_a_killed_broker_complete_once_through_the_other_at_their_attempt(
    start_broker, processes, tmp_path: Path
) -> None:
    doomed = start_broker("--pub", "tcp://127.0.0.1:*", broker_id="doomed")
    survivor = start_broker("--pub", "tcp://127.0.0.1:*", broker_id="survivor")
    ledger = tmp_path / "ledger"
    with Client(doomed.endpoint) as client:
        # Pending before any worker polls: every worker's first poll goes to its first endpoint,
        # the doomed broker, which delivers them all (nobody polls the survivor yet).
        ids = client.submit_many(
            [TaskSpec("sleepy", b"%g" % SECONDS, lease_timeout=LEASE, backoff_base=0) for _ in range(TASKS)]
        )
    workers = [
        spawn_worker(processes, f"{doomed.endpoint} {survivor.endpoint}", ledger, CONCURRENCY)
        for _ in range(WORKERS)
    ]
    wait_for(lambda: len(ledger_runs(ledger)) >= CONCURRENCY * WORKERS, timeout=20, what="every slot busy")
    doomed.kill()  # SIGKILL while every task is held, running or prefetched
    killed_at = time.time()
    # No handler could have returned before the kill, so no completion went through the doomed
    # broker: all of them went through the survivor, the only broker left.
    assert killed_at < min(run_starts(ledger).values()) + SECONDS, "too slow to kill in time"

    with Client(survivor.endpoint) as client:
        done = {task_id: client.result(task_id, timeout=20) for task_id in ids}
    runs = ledger_runs(ledger)
    assert Counter(t for t, _, _ in runs) == Counter(ids), runs  # each ran once, and only once
    delivered = {t: a for t, a, _ in runs}
    assert {t: (r.state, r.attempt) for t, r in done.items()} == {t: ("completed", delivered[t]) for t in ids}
    assert all(r.result == b"slept %d" % delivered[t] for t, r in done.items())
    assert {w.proc.pid for w in workers} == {pid for _, _, pid in runs}  # both workers took part
    assert all(w.proc.poll() is None for w in workers)
