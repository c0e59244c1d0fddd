"""Reading the handlers' ledger: every execution, whether or not its process survived."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Execution:
    """One run of a handler: started at `start` (wall clock) on a delivery from `broker`;
    `end`/`outcome` None if it never finished (its process was killed)."""

    task: int
    attempt: int
    pid: int
    start: float
    broker: str = ""
    end: float | None = None
    outcome: str | None = None


def read_ledger(folder: Path) -> list[Execution]:
    """All executions in the ledger files of `folder`, start and end lines joined."""
    runs: list[Execution] = []
    open_runs: dict[tuple[int, int, int], Execution] = {}
    for path in sorted(folder.glob("*.ledger")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 5:
                continue  # a line cut by a kill mid-write cannot happen with one write(2); be safe
            kind, task, attempt, pid, at = (
                parts[0],
                int(parts[1]),
                int(parts[2]),
                int(parts[3]),
                float(parts[4]),
            )
            key = (task, attempt, pid)
            if kind == "S":
                open_runs[key] = Execution(task, attempt, pid, at, parts[5] if len(parts) > 5 else "")
                runs.append(open_runs[key])
            elif kind == "E" and key in open_runs:
                run = open_runs.pop(key)
                run.end = at
                run.outcome = parts[5] if len(parts) > 5 else ""
    return sorted(runs, key=lambda e: (e.task, e.start))
