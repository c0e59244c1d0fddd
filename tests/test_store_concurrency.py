"""Many processes leasing from one queue: every task completed exactly once, never held twice."""

from __future__ import annotations

import multiprocessing

from conduit.store import Store
from conduit.task import Completion, TaskSpec

TASKS = 20_000
PROCESSES = 8


def _drain(dsn: str, schema: str, index: int) -> list[tuple[int, int]]:
    """One competing broker: lease batches, complete them, until the queue is empty."""
    leased: list[tuple[int, int]] = []
    with Store.open(dsn, schema=schema) as store:
        owner = store.acquire_broker(f"proc-{index}", "tcp://test", 60)
        while batch := store.lease(owner, "shared", 50):
            outcomes = store.complete([Completion(t.id, t.attempt, t.payload) for t in batch])
            assert outcomes == ["ok"] * len(batch)
            leased.extend((t.id, t.attempt) for t in batch)
    return leased


def test_eight_processes_complete_every_task_exactly_once(store: Store, db) -> None:
    for start in range(0, TASKS, 2000):
        store.enqueue([TaskSpec("shared", str(i).encode()) for i in range(start, start + 2000)])
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(PROCESSES) as pool:
        per_process = pool.starmap(_drain, [(db.dsn, db.schema, i) for i in range(PROCESSES)])
        pool.close()
        pool.join()
    all_leases = [lease for leases in per_process for lease in leases]
    assert len(all_leases) == TASKS  # nothing leased twice, nothing missed
    assert len({task_id for task_id, _ in all_leases}) == TASKS
    assert {attempt for _, attempt in all_leases} == {1}
    assert sum(1 for leases in per_process if leases) >= 2  # the processes really competed
    assert db.query("SELECT count(*) FROM tasks") == [(0,)]
    results = db.query("SELECT result FROM results WHERE state = 'completed' AND attempt = 1")
    assert sorted(bytes(r) for (r,) in results) == sorted(str(i).encode() for i in range(TASKS))
    assert store.queue_stats() == {"shared": {"completed": TASKS}}
