"""`conduit worker` as a user runs it: from the project's folder, with its own console script;
what it logs (start-up, each failure), a second Ctrl-C, its only broker down, no handlers."""

from __future__ import annotations

import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import Process, free_port
from test_e2e import wait_for

from conduit.client import Client, task_ref

CONDUIT = str(Path(sys.executable).parent / "conduit")  # the console script: no `python -m` path magic

APP = """
import os
import time

from conduit.client import Worker, task

worker = Worker(os.environ["BROKER"], concurrency=2, poll_timeout=1.0, heartbeat_interval=0.5)


@task(max_attempts=2, backoff_base=0)
def double(x: int) -> int:
    return 2 * x


@task(max_attempts=1)
def boom(why: str) -> None:
    raise ValueError(f"boom: {why}")


@task
def slow(seconds: float) -> None:
    time.sleep(seconds)


worker.register(double, boom, slow)
"""


def project(folder: Path, source: str = APP) -> Path:
    (folder / "myapp").mkdir()
    (folder / "myapp" / "__init__.py").write_text("")
    (folder / "myapp" / "tasks.py").write_text(textwrap.dedent(source))
    return folder


def conduit_worker(processes, folder: Path, endpoint: str, *extra: str) -> Process:
    env = {"BROKER": endpoint, "PYTHONPATH": ""}
    worker = Process(["worker", "myapp.tasks:worker", *extra], env, program=[CONDUIT], cwd=folder)
    processes.append(worker)
    return worker


def lines(worker: Process, event: str) -> list[str]:
    return [line for line in worker.log().splitlines() if f"event={event} " in f"{line} "]


def test_it_imports_from_the_current_folder_and_logs_start_up_and_failures(
    start_broker, processes, tmp_path: Path
) -> None:
    broker = start_broker()
    worker = conduit_worker(processes, project(tmp_path), broker.endpoint)
    with Client(broker.endpoint) as client:
        assert client.submit(task_ref("double"), 21).result(timeout=30) == 42
        failed = client.submit(task_ref("boom", max_attempts=1), "why not")
        assert client.result(failed.id, timeout=30).state == "dead"
    (started,) = lines(worker, "worker_started")
    assert f"brokers={broker.endpoint} queues=double,boom,slow concurrency=2 pool=thread" in started
    wait_for(lambda: lines(worker, "task_failed"), timeout=5, what="the failure's line")
    (failure,) = lines(worker, "task_failed")
    assert f"task={failed.id} queue=boom attempt=1 retry=False" in failure
    assert failure.endswith('error="ValueError: boom: why not"')  # the exception, in one line
    assert worker.stop() == 0


def test_a_second_ctrl_c_stops_at_once(start_broker, processes, tmp_path: Path) -> None:
    broker = start_broker()
    worker = conduit_worker(processes, project(tmp_path), broker.endpoint)
    with Client(broker.endpoint) as client:
        slow = client.submit(task_ref("slow"), 15.0)
        wait_for(lambda: client.lookup([slow.id])[0].state == "running", timeout=15, what="it to run")
    worker.proc.send_signal(signal.SIGINT)
    wait_for(lambda: lines(worker, "stopping"), timeout=5, what="the first Ctrl-C's line")
    time.sleep(0.5)
    assert worker.proc.poll() is None  # the first one waits for the running task
    began = time.monotonic()
    worker.proc.send_signal(signal.SIGINT)
    assert worker.proc.wait(5) == 130 and time.monotonic() - began < 3
    log = worker.log()
    assert "Traceback" not in log
    assert log.splitlines()[-1] == (
        "Error: stopped at once: the tasks it held run again once their leases expire"
    )


def test_its_only_broker_down_it_backs_off_and_comes_back(start_broker, processes, tmp_path: Path) -> None:
    port = free_port()
    worker = conduit_worker(processes, project(tmp_path), f"tcp://127.0.0.1:{port}")
    time.sleep(9)  # several failovers: logged once, retried with growing pauses
    assert len(lines(worker, "failover")) == 1, worker.log()
    broker = start_broker(port=port)
    with Client(broker.endpoint) as client:
        began = time.monotonic()
        assert client.submit(task_ref("double"), 2).result(timeout=30) == 4
        assert time.monotonic() - began < 6  # the pause stays short: two liveness intervals
    (recovered,) = lines(worker, "broker_recovered")
    assert "failures=" in recovered


@pytest.mark.parametrize(
    ("source", "target", "error"),
    [
        (
            "from conduit.client import Worker\nworker = Worker('tcp://127.0.0.1:1')\n",
            "myapp.tasks:worker",
            "Error: myapp.tasks:worker has no handlers: register a task (worker.register) or a handler"
            " (@worker.handler(queue)) before running it",
        ),
        (
            "x = 1\n",
            "myapp.tasks:missing",
            "Error: cannot load myapp.tasks:missing: module 'myapp.tasks' has no",
        ),
    ],
)
def test_a_worker_it_cannot_run_is_a_one_line_error(processes, tmp_path: Path, source, target, error) -> None:
    project(tmp_path, source)
    began = time.monotonic()
    worker = Process(["worker", target], {"PYTHONPATH": ""}, program=[CONDUIT], cwd=tmp_path)
    processes.append(worker)
    assert worker.proc.wait(10) == 1 and time.monotonic() - began < 3
    (line,) = worker.log().splitlines()
    assert line.startswith(error)
