"""Workers that end-to-end tests run as separate processes (`conduit worker handlers:worker`).

Each execution is appended to the ledger file named by CONDUIT_TEST_LEDGER before the handler
works ("id attempt pid start", the start in wall-clock seconds, the clock PostgreSQL's now() reads
on this host), so a test can count runs even of handlers whose process was killed mid-task, and
bound when a rerun started.
"""

from __future__ import annotations

import os
import time

from conduit.client import TaskContext, Worker

worker = Worker(
    os.environ.get("CONDUIT_TEST_ENDPOINT", "tcp://127.0.0.1:5555").split(),
    concurrency=int(os.environ.get("CONDUIT_TEST_CONCURRENCY", "2")),
    heartbeat_interval=0.5,
    poll_timeout=2.0,
)


def record(task: TaskContext) -> None:
    with open(os.environ["CONDUIT_TEST_LEDGER"], "a") as ledger:
        ledger.write(f"{task.id} {task.attempt} {os.getpid()} {time.time():.6f}\n")
        ledger.flush()


@worker.handler("sleepy")
def sleepy(task: TaskContext) -> bytes:
    """Sleeps for the number of seconds in its payload."""
    record(task)
    time.sleep(float(task.payload))
    return b"slept %d" % task.attempt
