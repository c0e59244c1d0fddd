"""conduit.client.AsyncClient: the Client's methods as coroutines, for asyncio applications.

Each request runs the synchronous Client's code on a small thread pool of the AsyncClient's own,
so the event loop never blocks and the app's default executor is left alone. The Client is
thread-safe (sockets per thread), so concurrent awaits go out concurrently and share the
broker's group commits. Waiting for a result sleeps on the event loop between lookups, so a
thousand awaited results hold no thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar, overload

from conduit.client.client import Client, ResultWait, TaskResult, WorkerSeen
from conduit.client.mesh import BrokerView
from conduit.client.stats import BrokerStats
from conduit.client.tasks import AsyncTaskHandle, Task
from conduit.task import Page, TaskDetail, TaskSpec

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class AsyncClient:
    """Takes the Client's arguments; `threads` bounds the requests in flight at once."""

    def __init__(self, endpoints: str | Sequence[str], *, threads: int = 8, **options: Any) -> None:
        self._client = Client(endpoints, **options)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="conduit-client")

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    @overload
    async def submit(
        self, target: Task[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncTaskHandle[R]: ...
    @overload
    async def submit(self, target: str, payload: bytes, /, **options: Any) -> int: ...
    async def submit(self, target: Task[Any, Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        """As Client.submit; a task's handle is awaited: `await (await c.submit(t, x)).result()`."""
        if isinstance(target, Task):
            handle = await self._call(self._client.submit, target, *args, **kwargs)
            return AsyncTaskHandle(handle.id, target, self)
        return await self._call(self._client.submit, target, *args, **kwargs)

    async def map(self, task: Task[..., R], calls: Iterable[Sequence[Any]]) -> list[AsyncTaskHandle[R]]:
        handles = await self._call(self._client.map, task, list(calls))
        return [AsyncTaskHandle(h.id, task, self) for h in handles]

    async def submit_many(self, tasks: Iterable[TaskSpec]) -> list[int]:
        return await self._call(self._client.submit_many, list(tasks))

    async def submit_batch(self, queue: str, payloads: Sequence[bytes], **options: Any) -> list[int]:
        return await self._call(self._client.submit_batch, queue, payloads, **options)

    async def lookup(self, ids: Sequence[int]) -> list[TaskResult]:
        return await self._call(self._client.lookup, ids)

    async def result(self, task_id: int, timeout: float | None = None) -> TaskResult:
        """Wait until the task ends, as Client.result does, sleeping on the event loop."""
        wait = ResultWait(task_id, timeout)
        while (pause := wait.pause(info := (await self.lookup([task_id]))[0])) is not None:
            await asyncio.sleep(pause)
        return info

    async def cancel(self, task_id: int) -> bool:
        return await self._call(self._client.cancel, task_id)

    async def cancel_many(self, ids: Sequence[int]) -> list[str]:
        return await self._call(self._client.cancel_many, ids)

    async def retry(self, ids: Sequence[int]) -> list[str]:
        return await self._call(self._client.retry, ids)

    async def workers(self, timeout: float = 1.0) -> list[WorkerSeen]:
        return await self._call(self._client.workers, timeout)

    async def queues(self) -> dict[str, dict[str, int]]:
        return await self._call(self._client.queues)

    async def list_tasks(self, **filters: Any) -> Page:
        """As Client.list_tasks: queue, state, older_than, newer_than, limit, after."""
        return await self._call(self._client.list_tasks, **filters)

    async def show(self, ids: Sequence[int]) -> list[TaskDetail]:
        return await self._call(self._client.show, ids)

    async def redrive(self, queue: str, timeout: float = 300.0) -> int:
        return await self._call(self._client.redrive, queue, timeout)

    async def purge(self, queue: str, timeout: float = 300.0) -> int:
        return await self._call(self._client.purge, queue, timeout)

    async def stats(self, timeout: float = 1.0) -> list[BrokerStats]:
        return await self._call(self._client.stats, timeout)

    async def pause(self, queue: str) -> bool:
        return await self._call(self._client.pause, queue)

    async def resume(self, queue: str) -> bool:
        return await self._call(self._client.resume, queue)

    async def ping(self) -> str:
        return await self._call(self._client.ping)

    async def brokers(self) -> list[BrokerView]:
        return await self._call(self._client.brokers)

    async def close(self) -> None:
        await self._call(lambda: None)  # requests queued before this one are done
        self._pool.shutdown(wait=True)
        self._client.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
