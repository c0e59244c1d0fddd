"""The Python side of the mixed demo: `conduit worker greet_worker:worker` (this folder on
PYTHONPATH). Same queue and answer shape as worker.js."""

from __future__ import annotations

import json
import os

from conduit.client import TaskContext, Worker

worker = Worker(os.environ.get("CONDUIT_DEMO_ENDPOINT", "tcp://127.0.0.1:5555"), concurrency=8)


@worker.handler("greet")
def greet(task: TaskContext) -> bytes:
    answer = {
        "by": "python",
        "pid": os.getpid(),
        "greeting": f"hello {task.payload.decode()}",
        "attempt": task.attempt,
    }
    return json.dumps(answer).encode()
