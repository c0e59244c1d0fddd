"""The worker that chaos runs start as processes (`conduit worker chaos.handlers:worker`).

Every execution is written to the ledger before the handler works (with the broker that
delivered it) and again when it ends, and the result names the attempt and process that produced
it, so the checker can tell which delivery's result the database kept. Payloads are JSON: {"s":
seconds to work, "f": 0 normal, 1 fail the first run, 2 fail permanently}.
"""

from __future__ import annotations

import json
import os
import time

from conduit.client import PermanentError, TaskContext, Worker

worker = Worker(
    os.environ.get("CHAOS_ENDPOINTS", "tcp://127.0.0.1:5555").split(),
    concurrency=int(os.environ.get("CHAOS_CONCURRENCY", "4")),
    heartbeat_interval=1.0,
    poll_timeout=2.0,
)
_ledger_fd: int | None = None


def _record(kind: str, task: TaskContext, extra: str) -> None:
    """One line, one write(2) on an O_APPEND file: whole even if the process is killed next.
    `extra` is the delivering broker on a start line, the outcome on an end line."""
    global _ledger_fd
    if _ledger_fd is None:
        path = os.path.join(os.environ["CHAOS_LEDGER_DIR"], f"{os.getpid()}.ledger")
        _ledger_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    line = f"{kind} {task.id} {task.attempt} {os.getpid()} {time.time():.6f} {extra}\n"
    os.write(_ledger_fd, line.encode())


def _work(task: TaskContext) -> bytes:
    spec = json.loads(task.payload)
    _record("S", task, task.broker)
    try:
        time.sleep(float(spec.get("s", 0)))
        mode = int(spec.get("f", 0))
        if mode == 2:
            raise PermanentError("chaos: permanent failure on purpose")
        if mode == 1 and task.failures == 0:
            raise RuntimeError("chaos: failing the first run on purpose")
    except BaseException:
        _record("E", task, "fail")
        raise
    _record("E", task, "ok")
    return f"{task.id}:{task.attempt}:{os.getpid()}".encode()


for _queue in os.environ.get("CHAOS_QUEUES", "chaos.a chaos.b").split():
    worker.handler(_queue)(_work)
