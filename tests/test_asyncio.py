"""asyncio: `async def` handlers and tasks run on the Worker's event loop, many at once with no
thread each; AsyncClient has the Client's methods as coroutines."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_e2e import running

from conduit.client import AsyncClient, Client, TaskContext, TaskFailed, Worker, current_task, task


@task(backoff_base=0, max_attempts=2)
async def nap(seconds: float, label: str) -> dict[str, object]:
    await asyncio.sleep(seconds)
    return {"label": label, "thread": threading.current_thread().name, "attempt": current_task().attempt}


@task(max_attempts=1)
async def broken() -> None:
    await asyncio.sleep(0)
    raise LookupError("async failure")


@task(queue="mixed")
def plain(x: int) -> str:
    return f"plain {x} in {threading.current_thread().name}"


@task(queue="mixed")
async def awaited(x: int) -> str:
    return f"awaited {x} in {threading.current_thread().name}"


def test_sync_and_async_tasks_share_a_queue(start_broker) -> None:
    broker = start_broker()
    worker = Worker(broker.endpoint, concurrency=2, poll_timeout=1.0)
    worker.register(plain, awaited)
    with Client(broker.endpoint) as client, running(worker):
        assert client.submit(plain, 1).result(timeout=30).startswith("plain 1 in conduit-handler-")
        assert client.submit(awaited, 2).result(timeout=30) == "awaited 2 in conduit-asyncio"


def test_async_handlers_run_many_at_once_on_one_thread(start_broker) -> None:
    broker = start_broker()
    worker = Worker(broker.endpoint, concurrency=50, poll_timeout=1.0, heartbeat_interval=0.5)
    worker.register(nap, broken)

    @worker.handler("raw-async")
    async def raw(t: TaskContext) -> bytes:
        await asyncio.sleep(0.01)
        return t.payload.upper()

    threads_before = threading.active_count()
    with Client(broker.endpoint) as client, running(worker):
        assert client.result(client.submit("raw-async", b"abc"), timeout=30).result == b"ABC"
        began = time.monotonic()
        handles = client.map(nap, [(1.0, f"n{i}") for i in range(50)])
        results = [h.result(timeout=30) for h in handles]
        took = time.monotonic() - began
        threads_during = threading.active_count()
        with pytest.raises(TaskFailed, match="LookupError: async failure"):
            client.submit(broken).result(timeout=30)
    assert [r["label"] for r in results] == [f"n{i}" for i in range(50)]
    assert {r["thread"] for r in results} == {"conduit-asyncio"}  # one event loop thread
    assert took < 5, f"50 one-second naps took {took:.1f}s: they did not overlap"
    # The worker's own threads (loop, 4... handler threads, the event loop): not one per task.
    assert threads_during - threads_before < 50 // 2


def test_async_client_round_trip(start_broker) -> None:
    broker = start_broker()
    worker = Worker(broker.endpoint, concurrency=8, poll_timeout=1.0)
    worker.register(nap)

    @worker.handler("echo")
    def echo(t: TaskContext) -> bytes:
        return t.payload

    async def main() -> None:
        async with AsyncClient(broker.endpoint) as client:
            handles = await asyncio.gather(*(client.submit(nap, 0.05, f"a{i}") for i in range(20)))
            values = await asyncio.gather(*(h.result(timeout=30) for h in handles))
            assert [v["label"] for v in values] == [f"a{i}" for i in range(20)]
            task_id = await client.submit("echo", b"raw bytes")
            assert (await client.result(task_id, timeout=30)).result == b"raw bytes"
            (info,) = await client.lookup([task_id])
            assert info.state == "completed"
            assert [h.id for h in await client.map(nap, [(0.0, "m")])] and await client.ping()
            later = await client.submit_batch("echo", [b"x", b"y"], delay=3600)
            assert await client.cancel(later[0]) is True
            assert (await client.result(later[0], timeout=5)).state == "cancelled"
            assert await client.cancel_many(later) == ["cancelled", "ok"]
            assert await client.retry(later[:1]) == ["ok"]  # pending again, and it runs
            assert (await client.result(later[0], timeout=30)).result == b"x"
            assert any("echo" in w.queues for w in await client.workers())

    with running(worker):
        asyncio.run(main())
