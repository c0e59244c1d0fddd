"""Tasks by name across languages: tasks defined with @task in Python, submitted from Python with
msgpack (and JSON) arguments, run by the Node worker (clients/node/test/tasks-worker.js) that
knows them only by name (docs/PROTOCOL.md §17)."""

from __future__ import annotations

import pytest
from conftest import Process
from test_conformance import NODE_DIR, require

from conduit.client import Client, TaskFailed, task


@task(max_attempts=2, backoff_base=0)
def scale(values: list[int], *, factor: int = 1) -> dict[str, object]:
    return {"by": "python", "scaled": [v * factor for v in values]}


@task(queue="words", serializer="json")
def greet(name: str) -> str:
    return f"hello {name}"


@task
def nothing() -> None:
    return None


@task(max_attempts=3, backoff_base=0)
def refuse(why: str) -> None:
    raise RangeError(why)


class RangeError(Exception):
    pass


def test_the_node_worker_runs_python_tasks_by_name(start_broker, processes, db) -> None:
    require("node")
    broker = start_broker()
    script = str(NODE_DIR / "test" / "tasks-worker.js")
    processes.append(Process([script], {"CONDUIT_TEST_ENDPOINT": broker.endpoint}, program=["node"]))
    with Client(broker.endpoint) as client:
        scaled = client.submit(scale, [1, 2, 3], factor=10).result(timeout=30)
        assert scaled == {"by": "node", "scaled": [10, 20, 30], "attempt": 1}  # Node ran it
        assert client.submit(greet, "ada").result(timeout=30) == "hello ada"  # JSON both ways
        assert client.submit(nothing).result(timeout=30) is None
        with pytest.raises(TaskFailed) as refused:
            client.submit(refuse, "no").result(timeout=30)
        unknown = client.submit("scale", b"\x93\xa7unknown\x90\x80")  # a name Node does not have
        garbage = client.submit("scale", b"not a call")
        assert client.result(unknown, timeout=30).state == "dead"
        assert 'no task named "unknown"' in (client.result(unknown).error or "")
        assert "not a call by name" in (client.result(garbage, timeout=30).error or "")
    assert (refused.value.type, refused.value.message) == ("RangeError", "refused: no")
    # A thrown error is retried as any failure; a payload that cannot be run fails at once.
    assert db.query("SELECT id, failures FROM results WHERE state = 'dead' ORDER BY id") == [
        (refused.value.task_id, 3),
        (unknown, 1),
        (garbage, 1),
    ]
