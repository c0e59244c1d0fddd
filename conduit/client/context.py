"""What a handler receives and how its outcome is captured; picklable, so handlers may run in processes.

Both are NamedTuples: built straight from a DELIVER's columns, several times faster than frozen
dataclasses, which matters at tens of thousands of tasks a second.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from itertools import repeat
from typing import NamedTuple

from conduit.wire import Delivery

Handler = Callable[["TaskContext"], bytes | None]


class PermanentError(Exception):
    """Raise from a handler to fail the task without retrying it (it goes straight to dead)."""


class TaskContext(NamedTuple):
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


def contexts(d: Delivery) -> list[TaskContext]:
    """The tasks of one DELIVER, one context each, built column by column."""
    columns = (d.id, d.queue, d.attempt, d.payload, d.priority, d.failures, d.max_attempts, d.lease_timeout)
    return list(map(TaskContext, *columns, repeat(d.broker)))


class Outcome(NamedTuple):
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
