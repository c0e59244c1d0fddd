"""Tasks as functions: @task defaults, calls by name with msgpack or JSON arguments, results
decoded by the handle, errors raised from it, retry policies per exception, and return types
checked where they are defined or failed for good at run time, never retried."""

from __future__ import annotations

import msgpack
import pytest
from test_e2e import running

from conduit.client import (
    Client,
    PermanentError,
    TaskContext,
    TaskFailed,
    Worker,
    current_task,
    task,
    task_ref,
)
from conduit.client.serializers import decode_call, peek_name
from conduit.errors import ConduitError


@task(max_attempts=3, backoff_base=0)
def add(a: int, b: int, *, scale: int = 1) -> dict[str, int | list[int]]:
    return {"sum": (a + b) * scale, "args": [a, b], "attempt": current_task().attempt}


@task(serializer="json", queue="texts")
def shout(text: str) -> str:
    return text.upper() + "!"


@task(serializer="json", queue="texts")
def count(text: str) -> int:
    return len(text)


@task(serializer="raw")
def reverse(data: bytes) -> bytes:
    return data[::-1]


@task(max_attempts=4, backoff_base=0, dont_retry=(KeyError,))
def flaky(kind: str) -> None:
    if kind == "key":
        raise KeyError("no such key")
    if kind == "permanent":
        raise PermanentError("never")
    if current_task().failures < 2:
        raise ConnectionError(f"try again ({current_task().failures})")


@task(max_attempts=5, backoff_base=0)
def untyped(kind: str):  # type: ignore[no-untyped-def]
    return {1, 2} if kind == "set" else "fine"


def worker_for(endpoint: str, *tasks) -> Worker:
    worker = Worker(endpoint, concurrency=4, poll_timeout=1.0, heartbeat_interval=0.5)
    worker.register(*tasks)
    return worker


def test_a_task_called_by_name_returns_its_decoded_value(start_broker, db) -> None:
    broker = start_broker()
    with Client(broker.endpoint) as client, running(worker_for(broker.endpoint, add, shout, count, reverse)):
        handle = client.submit(add, 2, 3, scale=10)
        assert handle.result(timeout=30) == {"sum": 50, "args": [2, 3], "attempt": 1}
        assert client.submit(shout, "hi").result(timeout=30) == "HI!"  # JSON, on a shared queue
        assert client.submit(count, "four").result(timeout=30) == 4
        assert client.submit(reverse, b"\x00abc").result(timeout=30) == b"cba\x00"  # raw bytes
        assert [h.result(timeout=30)["sum"] for h in client.map(add, [(1, 1), (2, 2), (3, 3)])] == [2, 4, 6]
        # A reference by name, from code that does not have the function, reaches it too.
        assert client.submit(task_ref("add"), 1, 2).result(timeout=30)["sum"] == 3
        raw = client.lookup([handle.id])[0].result
    # What travels: the queue is the task's name, the result its return value in msgpack, and
    # the task's defaults are its retry policy.
    assert db.query("SELECT queue FROM results WHERE id = %s", (handle.id,)) == [("add",)]
    assert msgpack.unpackb(raw) == {"sum": 50, "args": [2, 3], "attempt": 1}
    assert (3, 0.0) in db.query("SELECT max_attempts, backoff_base FROM policies")


def test_payloads_say_their_format_by_their_first_byte() -> None:
    assert decode_call(add.payload((1, 2), {"scale": 3})) == ("msgpack", "add", [1, 2], {"scale": 3})
    assert shout.payload(("x",), {}) == b'["shout",["x"],{}]'
    assert decode_call(b'["shout",["x"],{}]') == ("json", "shout", ["x"], {})
    assert peek_name(add.payload((1, 2), {})) == "add" and peek_name(b"plain text") is None
    with pytest.raises(
        ConduitError, match="the arguments of task 'shout' cannot be sent: json cannot encode"
    ):
        shout.payload((b"bytes",), {})  # JSON has no bytes: refused before anything is sent
    # The bytes docs/PROTOCOL.md §17 shows.
    payload = task_ref("scale").payload(([1, 2],), {"factor": 10})
    assert payload.hex(" ") == "93 a5 73 63 61 6c 65 91 92 01 02 81 a6 66 61 63 74 6f 72 0a"


def test_errors_are_raised_from_the_handle_and_retried_as_the_policy_says(start_broker, db) -> None:
    broker = start_broker()
    with Client(broker.endpoint) as client, running(worker_for(broker.endpoint, flaky)):
        assert client.submit(flaky, "transient").result(timeout=30) is None  # third attempt worked
        with pytest.raises(TaskFailed) as key_error:
            client.submit(flaky, "key").result(timeout=30)
        with pytest.raises(TaskFailed) as permanent:
            client.submit(flaky, "permanent").result(timeout=30)
    assert (key_error.value.type, key_error.value.message) == ("KeyError", "'no such key'")
    assert "Traceback" in key_error.value.error and "raise KeyError" in key_error.value.error
    assert permanent.value.type == "PermanentError"
    # dont_retry and PermanentError: one run each; the transient error: retried until it worked
    ended = db.query("SELECT state, failures FROM results ORDER BY id")
    assert ended == [("completed", 2), ("dead", 1), ("dead", 1)]


class Point:
    pass


def test_return_types_are_checked_at_registration() -> None:
    with pytest.raises(TypeError, match="returns Point, which msgpack cannot carry"):

        @task
        def locate() -> Point:
            return Point()

    with pytest.raises(TypeError, match="returns bytes, which json cannot carry"):

        @task(serializer="json")
        def blob() -> bytes:
            return b""

    worker = Worker("tcp://127.0.0.1:1")
    with pytest.raises(TypeError, match="handler for queue 'q' returns str, which raw cannot carry"):

        @worker.handler("q")
        def text(t: TaskContext) -> str:
            return "no"

    with pytest.raises(ValueError, match="runs tasks by name"):
        worker.register(shout)
        worker.handler("texts")(lambda t: None)

    @task
    def fine(x: int) -> list[dict[str, float | None]] | None:
        return None

    assert fine(1) is None  # called directly, a task is its function


def test_a_wrong_return_type_at_run_time_fails_for_good(start_broker, db) -> None:
    broker = start_broker()
    worker = worker_for(broker.endpoint, untyped)

    @worker.handler("raw-text")
    def text(t: TaskContext):  # type: ignore[no-untyped-def]
        return "not bytes"

    with Client(broker.endpoint) as client, running(worker):
        assert client.submit(untyped, "ok").result(timeout=30) == "fine"
        with pytest.raises(
            TaskFailed, match="TypeError: task 'untyped' returned a value that msgpack cannot"
        ):
            client.submit(untyped, "set").result(timeout=30)
        raw = client.result(client.submit("raw-text", b""), timeout=30)
        # A payload that is not a call of the task is refused for good too.
        garbage = client.result(client.submit("untyped", b"not a call"), timeout=30)
    assert raw.state == "dead" and "returned str, not bytes or None" in (raw.error or "")
    assert garbage.state == "dead" and "not a call by name" in (garbage.error or "")
    assert db.query("SELECT state, failures FROM results WHERE state = 'dead'") == [("dead", 1)] * 3


def test_a_process_pool_runs_tasks(start_broker) -> None:
    broker = start_broker()
    worker = Worker(broker.endpoint, pool="process", concurrency=2, poll_timeout=1.0)
    worker.register(add, shout, count)  # sent to the processes by reference: module and name
    with Client(broker.endpoint) as client, running(worker):
        assert client.submit(add, 1, 2).result(timeout=30) == {"sum": 3, "args": [1, 2], "attempt": 1}
        assert client.submit(count, "abc").result(timeout=30) == 3
