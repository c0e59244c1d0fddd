"""Tasks as functions: `@task` gives a function a name, a queue and its defaults, so a Client calls
it by name with arguments, and a Worker (Python, or Node: docs/PROTOCOL.md §17) runs it.

The defaults split in two. Submit options (queue, priority, attempts, backoff, lease timeout)
travel with each task; run options (time limit, which exceptions retry) belong to the worker
that runs it. A task is pickled by reference (module and name), so process pools can run it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from conduit.client.context import NoRetry, Route, TaskContext, TimeLimitExceeded
from conduit.client.serializers import (
    FORMATS,
    PayloadError,
    decode_call,
    decode_value,
    encode_call,
    encode_value,
)
from conduit.client.typecheck import unencodable
from conduit.errors import ConduitError
from conduit.task import TaskSpec, check_queue_name

if TYPE_CHECKING:
    from conduit.client.serializers import Format

P = ParamSpec("P")
R = TypeVar("R")
SERIALIZERS = (*FORMATS, "raw")
_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("conduit_task")


def current_task() -> TaskContext:
    """The delivery a task function is running for: its id, attempt, and `cancelled` event."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_task() is only known inside a task run by a Worker") from None


@dataclasses.dataclass(frozen=True)
class Task(Generic[P, R]):
    """A function run as a task. Call it directly to run it here; `client.submit(t, ...)` to queue it."""

    fn: Callable[P, R] | None
    name: str
    queue: str
    serializer: str = "msgpack"
    priority: int = 0
    max_attempts: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    lease_timeout: float = 30.0
    delay: float = 0.0  # per call, through options(): seconds before it may run
    key: str | None = None  # per call, through options(): an idempotency key
    time_limit: float | None = None
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        check_queue_name(self.queue)
        if not self.name or len(self.name) > 200:
            raise ValueError(f"a task name is 1 to 200 characters, got {self.name!r}")
        if self.serializer not in SERIALIZERS:
            raise ValueError(f"serializer must be one of {', '.join(SERIALIZERS)}, got {self.serializer!r}")
        if self.time_limit is not None and not 0 < self.time_limit < 1e9:
            raise ValueError(f"time_limit must be a positive number of seconds, got {self.time_limit}")
        # The policy as a TaskSpec would check it at submit time, checked now instead.
        TaskSpec(self.queue, b"", **self.policy()).validate(1)
        if self.fn is not None:
            problem = unencodable(self.fn, self.serializer)
            if problem:
                raise TypeError(f"task {self.name!r} {problem}")

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.fn is None:
            raise TypeError(f"task {self.name!r} is a reference to a task run elsewhere; submit it")
        return self.fn(*args, **kwargs)

    def options(self, **changes: Any) -> Task[P, R]:
        """The same task with other defaults, e.g. `client.submit(t.options(priority=-1), x)`."""
        return dataclasses.replace(self, **changes)

    def policy(self) -> dict[str, Any]:
        """The submit options every task of this kind carries."""
        return {
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "backoff_base": self.backoff_base,
            "backoff_max": self.backoff_max,
            "lease_timeout": self.lease_timeout,
            "delay": self.delay,
            "idempotency_key": self.key,
        }

    def payload(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        if self.serializer == "raw":
            if len(args) != 1 or kwargs or not isinstance(args[0], bytes | bytearray | memoryview):
                raise ConduitError(f"task {self.name!r} is raw: submit it with one bytes argument")
            return bytes(args[0])
        try:
            return encode_call(self._format, self.name, args, kwargs)
        except PayloadError as exc:
            raise ConduitError(str(exc)) from None

    def decode(self, result: bytes | None) -> R:
        """A completed task's result, as the function returned it."""
        if self.serializer == "raw" or result is None:
            return result  # type: ignore[return-value]
        return decode_value(self._format, result)

    @property
    def _format(self) -> Format:
        return "json" if self.serializer == "json" else "msgpack"

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def route(self) -> Route:
        run = self._run_async if self.is_async else self._run
        retry = not issubclass(TimeLimitExceeded, self.dont_retry) and issubclass(
            TimeLimitExceeded, self.retry_on
        )
        return Route(run, self.is_async, self.time_limit, retry)

    # -- in the worker ----------------------------------------------------------------------

    def _run(self, ctx: TaskContext) -> bytes | None:
        fmt, args, kwargs = self._arguments(ctx)
        token = _current.set(ctx)
        try:
            value = self.fn(*args, **kwargs)  # type: ignore[misc]
        except BaseException as exc:
            raise self._policy(exc) from None
        finally:
            _current.reset(token)
        return self._result(fmt, value)

    async def _run_async(self, ctx: TaskContext) -> bytes | None:
        fmt, args, kwargs = self._arguments(ctx)
        _current.set(ctx)  # the asyncio task's own context: nothing to reset
        try:
            value = await self.fn(*args, **kwargs)  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            raise self._policy(exc) from None
        return self._result(fmt, value)

    def _arguments(self, ctx: TaskContext) -> tuple[Format | None, list[Any], dict[str, Any]]:
        if self.serializer == "raw":
            return None, [ctx.payload], {}
        try:
            fmt, name, args, kwargs = decode_call(ctx.payload)
        except PayloadError as exc:
            raise NoRetry(exc) from None  # the same bytes fail the same way every time
        if name != self.name:
            raise NoRetry(PayloadError(f"the payload calls {name!r}, not {self.name!r}"))
        return fmt, args, kwargs

    def _policy(self, exc: BaseException) -> BaseException:
        """The exception as the task's retry policy takes it."""
        if isinstance(exc, self.dont_retry) or not isinstance(exc, self.retry_on):
            return NoRetry(exc).with_traceback(exc.__traceback__)
        return exc

    def _result(self, fmt: Format | None, value: Any) -> bytes | None:
        if fmt is None:
            if value is None or isinstance(value, bytes | bytearray | memoryview):
                return None if value is None else bytes(value)
            raise NoRetry(TypeError(f"raw task {self.name!r} returned {type(value).__name__}, not bytes"))
        try:
            return encode_value(fmt, value)
        except PayloadError as exc:
            raise NoRetry(TypeError(f"task {self.name!r} returned a value that {exc}")) from None

    def __reduce__(self) -> tuple[Any, ...]:
        if self.fn is None:
            return (Task, tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
        return (_load, (self.fn.__module__, self.fn.__qualname__))


def _load(module: str, qualname: str) -> Task[Any, Any]:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, Task):
        raise TypeError(f"{module}.{qualname} is not a task any more")
    return obj


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task(
    *,
    name: str | None = ...,
    queue: str | None = ...,
    serializer: str = ...,
    priority: int = ...,
    max_attempts: int = ...,
    backoff_base: float = ...,
    backoff_max: float = ...,
    lease_timeout: float = ...,
    time_limit: float | None = ...,
    retry_on: tuple[type[BaseException], ...] = ...,
    dont_retry: tuple[type[BaseException], ...] = ...,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...
def task(fn: Callable[..., Any] | None = None, /, **defaults: Any) -> Any:
    """Decorator: `@task` or `@task(queue=..., max_attempts=..., time_limit=...)`. The name is the
    function's unless given, and so is the queue. Exceptions in `dont_retry`, or not in
    `retry_on`, fail the task for good; others are retried with backoff."""

    def make(f: Callable[..., Any]) -> Task[Any, Any]:
        options = dict(defaults)
        name = options.pop("name", None) or f.__name__
        return Task(f, name, options.pop("queue", None) or name, **options)

    return make if fn is None else make(fn)


def task_ref(name: str, *, queue: str | None = None, **defaults: Any) -> Task[..., Any]:
    """A task that runs elsewhere (another codebase, a Node worker), to submit it by name."""
    return Task(None, name, queue or name, **defaults)


class TaskFailed(ConduitError):
    """The task ended dead; `type` and `message` are its last error's first line, `error` all of it."""

    def __init__(self, task_id: int, error: str | None) -> None:
        self.error = error or ""
        head = self.error.partition("\n")[0]
        self.type, _, self.message = head.partition(": ") if ": " in head else ("", "", head)
        super().__init__(f"task {task_id} failed: {head or 'no error recorded'}")
        self.task_id = task_id


class TaskCancelled(ConduitError):
    def __init__(self, task_id: int) -> None:
        super().__init__(f"task {task_id} was cancelled")
        self.task_id = task_id


def outcome(task: Task[Any, R], task_id: int, state: str, result: bytes | None, error: str | None) -> R:
    """What `result()` gives for a task that ended: its value, or its error raised."""
    if state == "completed":
        return task.decode(result)
    if state == "cancelled":
        raise TaskCancelled(task_id)
    raise TaskFailed(task_id, error)


@dataclasses.dataclass(frozen=True)
class TaskHandle(Generic[R]):
    """A submitted task: `result()` waits for it and gives the return value, or raises its error."""

    id: int
    task: Task[Any, R]
    client: Any  # conduit.client.Client (not imported: it imports this module)

    def result(self, timeout: float | None = None) -> R:
        info = self.client.result(self.id, timeout=timeout)
        return outcome(self.task, self.id, info.state, info.result, info.error)


@dataclasses.dataclass(frozen=True)
class AsyncTaskHandle(Generic[R]):
    """A task submitted through an AsyncClient: `await handle.result()`."""

    id: int
    task: Task[Any, R]
    client: Any  # conduit.client.AsyncClient

    async def result(self, timeout: float | None = None) -> R:
        info = await self.client.result(self.id, timeout=timeout)
        return outcome(self.task, self.id, info.state, info.result, info.error)
