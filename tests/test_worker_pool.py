"""Worker(pool="process"): handlers run in processes of their own, and a handler process that
dies (os._exit, a signal) fails its task, which is retried, while the worker goes on serving."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from test_e2e import running, wait_for

from conduit.client import Client, PermanentError, TaskContext, Worker
from conduit.client.client import TaskResult
from conduit.task import TaskSpec


# Handlers are module-level functions: a process pool sends them to its processes by name.
def whoami(task: TaskContext) -> bytes:
    return b"%d" % os.getpid()


def refuse(task: TaskContext) -> None:
    if task.payload == b"permanent":
        raise PermanentError("cannot be done")
    raise ValueError(f"bad payload {task.payload!r}")


def die_by_exit(task: TaskContext) -> bytes:
    if task.failures == 0:
        os._exit(3)  # no exception, no cleanup: the process is simply gone
    return b"survived %d" % os.getpid()


def die_by_signal(task: TaskContext) -> bytes:
    if task.failures == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return b"survived %d" % os.getpid()


def process_worker(endpoint: str) -> Worker:
    worker = Worker(endpoint, pool="process", concurrency=2, poll_timeout=1.0, heartbeat_interval=0.5)
    for queue, handler in (("whoami", whoami), ("refuse", refuse), ("exit", die_by_exit)):
        worker.handler(queue)(handler)
    worker.handler("signal")(die_by_signal)
    return worker


def test_process_pool_runs_handlers_in_other_processes(start_broker, db) -> None:
    broker = start_broker()
    with Client(broker.endpoint) as client, running(process_worker(broker.endpoint)):
        ids = client.submit_many([TaskSpec("whoami", b"") for _ in range(20)])
        pids = {int(client.result(i, timeout=30).result or b"0") for i in ids}
        assert os.getpid() not in pids and 0 not in pids and len(pids) <= 2  # its two processes
        failed = client.submit("refuse", b"x", max_attempts=2, backoff_base=0)
        dead = client.submit("refuse", b"permanent")
        ended = client.result(failed, timeout=30)
        assert (ended.state, ended.attempt) == ("dead", 2)
        assert "ValueError: bad payload b'x'" in (ended.error or "")  # the traceback, from the process
        assert client.result(dead, timeout=30).state == "dead"
    assert db.query("SELECT failures FROM results WHERE id = %s", (dead,)) == [(1,)]  # not retried


def outcome_while_serving(client: Client, task_id: int, thread: threading.Thread) -> TaskResult:
    """How the task ended; fails at once if the worker stops serving rather than at a timeout."""
    deadline = time.monotonic() + 30
    while (info := client.lookup([task_id])[0]).state not in ("completed", "dead", "cancelled"):
        assert thread.is_alive(), f"the worker stopped serving; task {task_id} is left {info.state}"
        assert time.monotonic() < deadline, f"task {task_id} still {info.state}"
        time.sleep(0.05)
    return info


@pytest.mark.parametrize("queue", ["exit", "signal"])
def test_a_handler_process_that_dies_fails_its_task_for_a_retry(start_broker, db, queue: str) -> None:
    broker = start_broker()
    with Client(broker.endpoint) as client, running(process_worker(broker.endpoint)):
        doomed = client.submit(queue, b"", backoff_base=0)

        def failed_by_the_death() -> list[tuple[object, ...]]:
            return db.query(
                "SELECT failures, last_error FROM tasks WHERE id = %s"
                " UNION ALL SELECT failures, last_error FROM results WHERE id = %s",
                (doomed, doomed),
            )

        wait_for(lambda: failed_by_the_death()[0][0] == 1, timeout=30, what="the failure")
        ((_, error),) = failed_by_the_death()
        assert "handler process died" in str(error)  # reported by the worker, not a lease expiry
        assert client.lookup([doomed])[0].state != "dead"  # it has attempts left: retried


@pytest.mark.parametrize("queue", ["exit", "signal"])
def test_after_a_handler_process_died_the_worker_serves_on(start_broker, db, queue: str) -> None:
    broker = start_broker()
    with Client(broker.endpoint) as client, running(process_worker(broker.endpoint)) as thread:
        doomed = client.submit(queue, b"", backoff_base=0)
        done = outcome_while_serving(client, doomed, thread)
        assert (done.state, done.attempt) == ("completed", 2), done
        assert (done.result or b"").startswith(b"survived")
        ids = client.submit_many([TaskSpec("whoami", b"") for _ in range(10)])
        assert {outcome_while_serving(client, i, thread).state for i in ids} == {"completed"}
