"""A worker for paced loads (`conduit worker paced:worker`): one queue, short sleeping handlers
that return their payload, so a test can tell from `results` when each batch was done."""

from __future__ import annotations

import os
import random
import time

from conduit.client import TaskContext, Worker

worker = Worker(os.environ["CONDUIT_TEST_ENDPOINT"].split(), concurrency=4, poll_timeout=2.0)


@worker.handler(os.environ["CONDUIT_TEST_QUEUE"])
def paced(task: TaskContext) -> bytes:
    time.sleep(random.random() * 0.02)
    return task.payload
