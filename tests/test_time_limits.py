"""Hard time limits in each pool (a process is ended, an asyncio task cancelled, a thread given
up on and its late result refused), and cooperative cancellation seen by a running handler: an
event for sync handlers, CancelledError for async ones."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
from test_e2e import running, wait_for

from conduit.client import Client, TaskContext, TaskFailed, Worker, current_task, task

seen: dict[str, threading.Event] = {"late": threading.Event(), "cancelled": threading.Event()}


@task(time_limit=1.0, max_attempts=1)
def stuck_thread(seconds: float) -> str:
    time.sleep(seconds)  # ignores its event: only the limit ends it
    seen["late"].set()
    return "late"


@task(time_limit=1.0, max_attempts=1)
async def stuck_async() -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        seen["cancelled"].set()
        raise


def spin(t: TaskContext) -> bytes:
    (Path(t.payload.decode()) / "pid").write_text(str(os.getpid()))
    while True:  # a runaway that never looks at anything: only ending its process stops it
        pass


def quick(t: TaskContext) -> bytes:
    return b"%d" % os.getpid()


@task
def patient() -> str:
    ctx = current_task()
    while not ctx.cancelled.wait(0.05):
        pass
    seen["cancelled"].set()
    return "stopped early"


def watch(t: TaskContext) -> None:
    while not t.cancelled.wait(0.05):
        pass
    (Path(t.payload.decode()) / "cancelled").write_text(str(os.getpid()))


@task
async def patient_async() -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        seen["cancelled"].set()
        raise


def worker(endpoint: str, **options: object) -> Worker:
    return Worker(endpoint, concurrency=1, poll_timeout=1.0, heartbeat_interval=0.3, **options)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def fresh() -> None:
    for event in seen.values():
        event.clear()


def test_a_thread_past_its_limit_fails_its_task_and_its_late_result_is_refused(
    start_broker, db, caplog
) -> None:
    broker = start_broker()
    w = worker(broker.endpoint)
    w.register(stuck_thread)
    w.handler("quick")(quick)
    with Client(broker.endpoint) as client, running(w):
        began = time.monotonic()
        handle = client.submit(stuck_thread, 4.0)
        with pytest.raises(TaskFailed) as failed:
            handle.result(timeout=30)
        assert time.monotonic() - began < 3.5
        # concurrency 1, and the stuck thread still sleeps: a new thread serves meanwhile
        assert client.result(client.submit("quick", b""), timeout=10).state == "completed"
        assert not seen["late"].is_set()
        wait_for(seen["late"].is_set, timeout=10, what="the late handler to return")
        wait_for(lambda: "late_result_refused" in caplog.text, timeout=5, what="the refusal")
        after = client.result(handle.id, timeout=5)
    assert (
        failed.value.type == "TimeLimitExceeded" and "1s (its thread was abandoned)" in failed.value.message
    )
    assert (after.state, after.result) == ("dead", None)  # the late "late" never landed


def test_a_process_past_its_limit_is_ended(start_broker, db, tmp_path: Path) -> None:
    broker = start_broker()
    w = worker(broker.endpoint, pool="process")
    w.handler("spin", time_limit=1.0)(spin)
    w.handler("quick")(quick)
    with Client(broker.endpoint) as client, running(w):
        began = time.monotonic()
        ended = client.result(client.submit("spin", str(tmp_path).encode(), max_attempts=1), timeout=30)
        took = time.monotonic() - began
        pid = int((tmp_path / "pid").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone, and reaped
        served = client.result(client.submit("quick", b""), timeout=30)
    assert ended.state == "dead" and (ended.error or "").startswith("TimeLimitExceeded")
    assert "(its process was ended)" in (ended.error or "") and took < 4
    assert served.state == "completed" and int(served.result or 0) not in (0, pid, os.getpid())


def test_an_async_task_past_its_limit_is_cancelled(start_broker) -> None:
    broker = start_broker()
    w = worker(broker.endpoint)
    w.register(stuck_async)
    with (
        Client(broker.endpoint) as client,
        running(w),
        pytest.raises(TaskFailed, match=r"TimeLimitExceeded: .*its asyncio task was cancelled"),
    ):
        client.submit(stuck_async).result(timeout=30)
    assert seen["cancelled"].is_set()  # the handler saw CancelledError


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_running_handler_sees_its_task_cancelled(start_broker, kind: str) -> None:
    broker = start_broker()
    w = worker(broker.endpoint)
    w.register(patient if kind == "thread" else patient_async)
    with Client(broker.endpoint) as client, running(w):
        handle = client.submit(patient if kind == "thread" else patient_async)
        wait_for(lambda: client.lookup([handle.id])[0].state == "running", timeout=10, what="it to run")
        assert client.cancel(handle.id)
        began = time.monotonic()
        wait_for(seen["cancelled"].is_set, timeout=5, what="the handler to see the cancellation")
        assert time.monotonic() - began < 2  # within a few heartbeats (0.3 s)
        assert client.lookup([handle.id])[0].state == "cancelled"


def test_a_handler_process_sees_its_task_cancelled(start_broker, tmp_path: Path) -> None:
    broker = start_broker()
    w = worker(broker.endpoint, pool="process")
    w.handler("watch")(watch)
    with Client(broker.endpoint) as client, running(w):
        task_id = client.submit("watch", str(tmp_path).encode())
        wait_for(lambda: client.lookup([task_id])[0].state == "running", timeout=10, what="it to run")
        client.cancel(task_id)
        wait_for((tmp_path / "cancelled").exists, timeout=5, what="the handler process to see it")
    assert int((tmp_path / "cancelled").read_text()) != os.getpid()
