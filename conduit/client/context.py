"""What a handler receives and how its outcome is captured; picklable, so handlers may run in processes."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Handler = Callable[["TaskContext"], bytes | None]


class PermanentError(Exception):
    """Raise from a handler to fail the task without retrying it (it goes straight to dead)."""


@dataclass(frozen=True)
class TaskContext:
    """One delivery of a task. `attempt` grows with every delivery: a handler can run again after a
    crash or an expired lease, so make it idempotent (at-least-once execution)."""

    id: int
    queue: str
    attempt: int
    payload: bytes
    priority: int
    failures: int
    max_attempts: int
    lease_timeout: float
    broker: str

    @classmethod
    def from_wire(cls, t: dict[str, Any]) -> TaskContext:
        return cls(
            t["id"], t["queue"], t["attempt"], t["payload"], t["priority"], t["failures"],
            t["max_attempts"], t["lease_timeout"], t["broker"],
        )  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    task: TaskContext
    ok: bool
    result: bytes | None = None
    error: str = ""
    retry: bool = True


def invoke(handler: Handler, task: TaskContext) -> Outcome:
    """Run a handler; any exception becomes a failure carrying its traceback."""
    try:
        result = handler(task)
    except PermanentError as exc:
        return Outcome(task, ok=False, error=f"PermanentError: {exc}", retry=False)
    except BaseException as exc:
        text = "".join(traceback.format_exception(exc))[-4000:]
        return Outcome(task, ok=False, error=text)
    if result is not None and not isinstance(result, bytes | bytearray | memoryview):
        return Outcome(task, ok=False, error=f"handler returned {type(result).__name__}, not bytes or None")
    return Outcome(task, ok=True, result=None if result is None else bytes(result))
