"""What a handler receives and how its outcome is captured; picklable, so handlers may run in processes.

Both are NamedTuples: built straight from a DELIVER's columns, several times faster than frozen
dataclasses, which matters at tens of thousands of tasks a second. A task's cancellation event
is made only when someone asks for it (the handler, or the loop telling it the task was lost),
so tasks that never look cost nothing.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Awaitable, Callable
from itertools import repeat
from typing import Any, NamedTuple, Protocol

from conduit.wire import Delivery

Handler = Callable[["TaskContext"], Any]  # returns bytes or None; an async one, an awaitable of them


class PermanentError(Exception):
    """Raise from a handler to fail the task without retrying it (it goes straight to dead)."""


class TimeLimitExceeded(Exception):
    """A task ran past its time limit and was ended (its process) or given up on (its thread)."""


class NoRetry(Exception):
    """Wraps an exception that the task's policy says not to retry (conduit.client.tasks)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class CancelSignal(Protocol):
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


_events: dict[tuple[int, int], threading.Event] = {}  # (id, attempt) -> the task's event
_process_event: CancelSignal | None = None  # in a handler process: its slot's event (processes.py)


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

    @property
    def cancelled(self) -> CancelSignal:
        """Set once the worker learns the task is not its own any more (cancelled, or its lease
        lost) or that it ran past its time limit: a long handler checks it and stops early."""
        if _process_event is not None:
            return _process_event
        return _events.setdefault((self.id, self.attempt), threading.Event())


def signal_cancel(task: TaskContext) -> None:
    _events.setdefault((task.id, task.attempt), threading.Event()).set()


def forget(task: TaskContext) -> None:
    """The task's outcome is in: its event, if any was made, is no longer needed."""
    if _events:
        _events.pop((task.id, task.attempt), None)


def contexts(d: Delivery) -> list[TaskContext]:
    """The tasks of one DELIVER, one context each, built column by column."""
    columns = (d.id, d.queue, d.attempt, d.payload, d.priority, d.failures, d.max_attempts, d.lease_timeout)
    return list(map(TaskContext, *columns, repeat(d.broker)))


class Route(NamedTuple):
    """How one task is run: its handler, whether that is a coroutine function, its hard time
    limit in seconds, and whether running past that limit is retried."""

    handler: Handler
    is_async: bool = False
    time_limit: float | None = None
    retry_timeouts: bool = True


class Outcome(NamedTuple):
    task: TaskContext
    ok: bool
    result: bytes | None = None
    error: str = ""
    retry: bool = True
    handler_done: bool = True  # False: failed at its time limit while its thread runs on


def describe(exc: BaseException) -> str:
    """`Type: message` on the first line (what logs and TaskFailed show), then the traceback."""
    head = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    trace = "".join(traceback.format_exception(exc))[-4000:]
    return f"{head}\n{trace}"


def failure(task: TaskContext, exc: BaseException) -> Outcome:
    if isinstance(exc, PermanentError):
        return Outcome(task, ok=False, error=f"PermanentError: {exc}", retry=False)
    if isinstance(exc, NoRetry):
        return Outcome(task, ok=False, error=describe(exc.cause), retry=False)
    return Outcome(task, ok=False, error=describe(exc))


def success(task: TaskContext, result: object) -> Outcome:
    """A handler's return value as an outcome; one of the wrong type fails for good, since
    running it again returns the same type."""
    if result is None:
        return Outcome(task, ok=True)
    if isinstance(result, bytes | bytearray | memoryview):
        return Outcome(task, ok=True, result=bytes(result))
    error = (
        f"TypeError: the handler for queue {task.queue!r} returned {type(result).__name__}, not bytes"
        " or None (define it with @task to return other values)"
    )
    return Outcome(task, ok=False, error=error, retry=False)


def timed_out(task: TaskContext, route: Route, how: str, handler_done: bool = True) -> Outcome:
    error = f"TimeLimitExceeded: the task ran past its time limit of {route.time_limit:g}s ({how})"
    return Outcome(task, ok=False, error=error, retry=route.retry_timeouts, handler_done=handler_done)


def invoke(handler: Handler, task: TaskContext) -> Outcome:
    """Run a handler; any exception becomes a failure carrying its traceback."""
    try:
        result = handler(task)
    except BaseException as exc:
        return failure(task, exc)
    return success(task, result)


async def invoke_async(handler: Callable[[TaskContext], Awaitable[Any]], task: TaskContext) -> Outcome:
    try:
        result = await handler(task)
    except Exception as exc:  # CancelledError is not caught: the runner tells why it was cancelled
        return failure(task, exc)
    return success(task, result)
