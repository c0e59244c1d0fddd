"""The conformance handlers for the Python Worker; clients/node/test/conformance-worker.js has the
same ones for Node. Run as `conduit worker handlers:worker` with this folder on PYTHONPATH.

Each run is appended to the ledger file (CONDUIT_TEST_LEDGER) before the handler works, as
"id attempt pid start" (the start in wall-clock seconds, the clock PostgreSQL's now() reads on this
host), so a test counts runs even of a process killed mid-task, and bounds when a run began.
"""

from __future__ import annotations

import os
import time

from conduit.client import PermanentError, TaskContext, Worker

env = os.environ
worker = Worker(
    env.get("CONDUIT_TEST_ENDPOINT", "tcp://127.0.0.1:5555").split(),
    concurrency=int(env.get("CONDUIT_TEST_CONCURRENCY", "2")),
    prefetch=int(env["CONDUIT_TEST_PREFETCH"]) if "CONDUIT_TEST_PREFETCH" in env else None,
    poll_timeout=float(env.get("CONDUIT_TEST_POLL_TIMEOUT", "1")),
    heartbeat_interval=float(env.get("CONDUIT_TEST_HEARTBEAT", "0.5")),
)


def record(task: TaskContext) -> None:
    if "CONDUIT_TEST_LEDGER" in env:
        with open(env["CONDUIT_TEST_LEDGER"], "a") as ledger:
            ledger.write(f"{task.id} {task.attempt} {os.getpid()} {time.time():.6f}\n")


@worker.handler("echo")
def echo(task: TaskContext) -> bytes:
    record(task)
    return task.payload  # the payload back, byte for byte


@worker.handler("whoami")
def whoami(task: TaskContext) -> bytes:
    record(task)
    return f"python {task.broker} {task.attempt}".encode()


@worker.handler("flaky")
def flaky(task: TaskContext) -> bytes:
    record(task)
    if task.failures == 0:
        raise RuntimeError("flaky: first try fails")
    return f"ok after {task.failures} failure(s)".encode()


@worker.handler("doomed")
def doomed(task: TaskContext) -> None:
    record(task)
    raise PermanentError("doomed: cannot be done")


@worker.handler("sleepy")
def sleepy(task: TaskContext) -> bytes:
    record(task)
    time.sleep(float(task.payload))
    return b"slept %d" % task.attempt


@worker.handler("gated")
def gated(task: TaskContext) -> bytes:
    """Runs until the file its payload names exists: a test ends the run when it has seen enough."""
    record(task)
    deadline = time.monotonic() + 60
    while not os.path.exists(task.payload) and time.monotonic() < deadline:
        time.sleep(0.05)
    return b"opened %d" % task.attempt


@worker.handler("noop")
def noop(task: TaskContext) -> None:
    return None
