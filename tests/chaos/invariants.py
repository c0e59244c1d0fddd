"""The checker: the durability claims, tested against ground truth from the database (results,
live tasks, idempotency keys, the audit of every row that entered `results`) and the ledger."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg

from chaos.faults import Fault
from chaos.ledger import Execution
from chaos.load import Submitted

FINAL = ("completed", "dead", "cancelled")
WORKER_FAULTS = ("worker_kill", "worker_pause", "worker_host_cut", "crash")
MESH_FAULTS = (
    *("broker_kill", "broker_pause", "db_terminate", "pg_restart", "pg_pause", "crash"),
    *("broker_isolate", "db_cut", "db_oneway"),  # partitions (--netns); a client cut explains nothing
)
LEASE_TERM = 3.0  # the brokers' lease term in a chaos run (Cluster's default)
# A run is in hand from its start to its end, or until the run after it started if it never
# ended; its report can still be lost for up to a lease term after that (its broker pauses, and
# past its term another takes its buffer over), so the window to explain a re-execution ends
# there. It begins earlier: a fault is felt after it is over, as a broker learns that its lease
# renewal failed up to a lease term later and fences what it delivered meanwhile, and a delivery
# may wait in a worker's prefetch behind long tasks (4 s at most) before it runs. A fault that
# ended more than this before the run started explains nothing.
AFTERMATH = 10.0
CLOCK_SLACK = 0.005  # seconds: time.time() rounding between processes on one machine


@dataclass
class Truth:
    """What the database holds at the end."""

    results: dict[int, tuple[str, int, int, int, bytes | None]]  # id -> state, attempt, failures, max, result
    live: dict[int, str]  # id -> state, for tasks still in `tasks`
    keys: dict[str, int]  # idempotency key -> task id
    finals: dict[int, list[tuple[str, int]]]  # id -> every (state, attempt) that entered results

    @classmethod
    def read(cls, conn: psycopg.Connection[Any]) -> Truth:
        results = {
            r[0]: (r[1], r[2], r[3], r[4], r[5])
            for r in conn.execute("SELECT id, state, attempt, failures, max_attempts, result FROM results")
        }
        live = dict(conn.execute("SELECT id, state FROM live_tasks").fetchall())
        keys = {k: i for k, i in conn.execute("SELECT key, task_id FROM idempotency_keys")}
        finals: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for task_id, state, attempt in conn.execute("SELECT id, state, attempt FROM chaos_audit ORDER BY at"):
            finals[task_id].append((state, attempt))
        return cls(results, live, keys, dict(finals))


@dataclass
class Verdict:
    counts: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    explained: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def violate(self, what: str) -> None:
        self.violations.append(what)


def check(
    tasks: list[Submitted],
    truth: Truth,
    runs: list[Execution],
    faults: list[Fault],
    *,
    broker_rss_max_kb: dict[str, int],
    rss_limit_kb: int,
    unexpected_exits: list[tuple[float, str, int, int | None]],
) -> Verdict:
    v = Verdict()
    acked = [t for t in tasks if t.id is not None]
    unacked = [t for t in tasks if t.id is None]
    by_id = {t.id: t for t in acked}
    committed_unacked = [t for t in unacked if t.key in truth.keys]
    v.counts["submitted_acknowledged"] = len(acked)
    v.counts["submit_unacknowledged"] = len(unacked)
    v.counts["submit_unacknowledged_but_committed"] = len(committed_unacked)

    # Durable submit: an acknowledged id is the one its key names; two tasks never share a key.
    for t in acked:
        if truth.keys.get(t.key) != t.id:
            v.violate(f"task {t.id} (key {t.key}) acknowledged but its key names {truth.keys.get(t.key)}")
    if len(set(by_id)) != len(acked):
        v.violate("two acknowledged submits got the same id")
    # No task the producers did not ask for: a retried submit never made a second one.
    known = set(by_id) | {truth.keys[t.key] for t in committed_unacked}
    for task_id in sorted((set(truth.results) | set(truth.live)) - known):
        v.violate(f"task {task_id} exists but no submit of ours names it (a duplicate?)")

    # Nothing lost: every acknowledged task (and every committed unacknowledged one) is final.
    lost = 0
    for t in [*acked, *committed_unacked]:
        task_id = t.id if t.id is not None else truth.keys[t.key]
        row = truth.results.get(task_id)
        if row is None or row[0] not in FINAL:
            lost += 1
            v.violate(
                f"task {task_id} never finished: {truth.live.get(task_id, 'missing from the database')}"
            )
    v.counts["lost"] = lost
    states = [truth.results[t.id][0] for t in acked if t.id in truth.results]
    for state in FINAL:
        v.counts[state] = states.count(state)

    # Finished at most once: the audit saw one final row per task, and no finished task is live.
    double = [i for i, rows in truth.finals.items() if len(rows) > 1]
    double += [i for i in truth.live if i in truth.results]
    for task_id in double:
        v.violate(f"task {task_id} finished more than once: {truth.finals.get(task_id)}")
    v.counts["double_completions"] = len(set(double))

    # Fenced completion: the stored result is the one the lease holder's run produced.
    runs_by_task: dict[int, list[Execution]] = defaultdict(list)
    for run in runs:
        runs_by_task[run.task].append(run)
    wrong = 0
    for task_id, (state, attempt, failures, max_attempts, result) in truth.results.items():
        if state == "completed":
            parts = (result or b"").decode(errors="replace").split(":")
            ok_runs = {(r.attempt, r.pid) for r in runs_by_task[task_id] if r.outcome == "ok"}
            if (
                len(parts) != 3
                or int(parts[0]) != task_id
                or int(parts[1]) != attempt
                or (attempt, int(parts[2])) not in ok_runs
            ):
                wrong += 1
                v.violate(f"task {task_id} completed at attempt {attempt} with result {result!r}")
        elif state == "dead":
            sub = by_id.get(task_id)
            if not (sub is not None and sub.mode == 2) and failures < max_attempts:
                v.violate(f"task {task_id} dead after {failures} of {max_attempts} failures, not on purpose")
    v.counts["wrong_results"] = wrong

    # Time: no run before run_at (which is no earlier than the submit's send time plus its delay).
    early = 0
    for run in runs:
        sub = by_id.get(run.task)
        if sub is not None and sub.delay and run.start < sub.sent + sub.delay - CLOCK_SLACK:
            early += 1
            v.violate(f"task {sub.id} ran {sub.sent + sub.delay - run.start:.3f}s before its run_at")
    v.counts["ran_before_run_at"] = early

    # At-least-once, with a cause: a run beyond the first follows the failure on purpose of the
    # run before it, or a fault, on its process or of the mesh or database, while that run was in
    # hand. The same attempt never runs twice (a delivery is never duplicated).
    re_executions = unexplained = 0
    for task_id, task_runs in runs_by_task.items():
        attempts = [r.attempt for r in task_runs]
        if len(attempts) != len(set(attempts)):
            v.violate(f"task {task_id}: one attempt ran twice: {[(r.attempt, r.pid) for r in task_runs]}")
        for j in range(1, len(task_runs)):
            re_executions += 1
            cause = _cause(task_runs[j - 1], task_runs[j], faults)
            if cause is None:
                unexplained += 1
                v.violate(
                    f"task {task_id} ran again (attempt {task_runs[j].attempt}) with no fault to explain it: "
                    + ", ".join(f"{r.attempt}@{r.pid} {r.outcome}" for r in task_runs)
                )
            else:
                v.explained[cause] += 1
    v.counts["executions"] = len(runs)
    v.counts["re_executions"] = re_executions
    v.counts["unexplained_re_executions"] = unexplained

    # Bounded memory, and nobody crashed on their own.
    for name, kb in broker_rss_max_kb.items():
        if kb > rss_limit_kb:
            v.violate(f"broker {name} grew to {kb // 1024} MB (limit {rss_limit_kb // 1024} MB)")
    for at, name, pid, code in unexpected_exits:
        v.violate(f"{name} (pid {pid}) exited on its own with code {code} at {at:.1f}")
    v.counts["unexpected_exits"] = len(unexpected_exits)
    return v


def _cause(before: Execution, again: Execution, faults: list[Fault]) -> str | None:
    """Why `again` ran after `before` (the run of the task that started last before it); None if
    nothing explains it. A worker fault counts on the process that ran `before` while it was in
    hand, or on the one that runs `again` (a paused worker runs a delivery it lost, late, when it
    resumes); a mesh fault counts while `before` was in hand."""
    if before.outcome == "fail":
        return "handler_failure"
    held = (before.start - AFTERMATH, (before.end if before.end is not None else again.start) + LEASE_TERM)
    late = (again.start - AFTERMATH, again.start)
    for f in faults:
        if f.start > again.start:
            continue
        end = f.end or f.start
        if f.kind in WORKER_FAULTS and (
            (before.pid in f.pids and _overlap(f.start, end, *held))
            or (again.pid in f.pids and _overlap(f.start, end, *late))
        ):
            return f.kind
    for f in faults:
        if f.kind in MESH_FAULTS and f.start <= again.start and _overlap(f.start, f.end or f.start, *held):
            return f.kind
    return None


def _overlap(a0: float, a1: float, b0: float, b1: float) -> bool:
    return a0 <= b1 and b0 <= a1
