"""The worker of throughput.py's paced scenario (`conduit worker paced:worker`, bench/ on the path).

Each task sleeps the seconds its payload names, as a short I/O-bound handler would, so a worker's
loop must be woken by finishing handlers rather than by a socket kept busy with deliveries. The
result is the handler's start time and process id: the benchmark counts what each worker ran, and
when, from the results alone.
"""

from __future__ import annotations

import os
import struct
import time

from conduit import demo
from conduit.client import TaskContext, Worker

SLEEP = struct.Struct("!f")  # the payload starts with the seconds to sleep
RESULT = struct.Struct("!dI")  # started (wall clock), pid

# Endpoints, concurrency and prefetch come from the command line. Polls wait 2 s, not 5: batches
# come every half second, so no poll waits that long under load, but stopping waits one out.
worker = Worker("tcp://127.0.0.1:5555", poll_timeout=2.0)


def payload(seconds: float, size: int) -> bytes:
    """A task that sleeps `seconds`, padded to `size` bytes like the other scenarios' payloads."""
    return SLEEP.pack(seconds).ljust(size, b"x")


@worker.handler(demo.QUEUE)
def nap(task: TaskContext) -> bytes:
    started = time.time()
    time.sleep(SLEEP.unpack_from(task.payload)[0])
    return RESULT.pack(started, os.getpid())
