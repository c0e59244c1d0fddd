"""conduit.client.Worker: long-polls a broker, runs handlers concurrently, heartbeats, reports back.

One thread owns the sockets and all bookkeeping (conduit.client.loop); handlers run in a thread
or process pool and hand their outcomes back through a queue and a wake-up pipe. Completions are
resent until the broker acknowledges their commit, so a finished task is not run again for nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence

import zmq

from conduit.client.context import Handler, Outcome
from conduit.client.link import LIVENESS
from conduit.client.loop import Loop
from conduit.client.runners import ProcessRunner, ThreadRunner
from conduit.client.wakeup import Wakeup
from conduit.task import check_queue_name
from conduit.wire import MAX_BATCH, MAX_NAME_CHARS, MAX_POLL_TIMEOUT, MAX_QUEUES


class Worker:
    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        concurrency: int = 4,
        prefetch: int | None = None,
        pool: str = "thread",
        poll_timeout: float = 5.0,
        heartbeat_interval: float = 2.5,
        worker_id: str | None = None,
        gossip: Sequence[str] = (),
        liveness: float = LIVENESS,
    ) -> None:
        """`heartbeat_interval` keeps task leases alive (a database write); `liveness` is how
        soon a quiet broker is PINGed, and twice it how soon it is left for another."""
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self.gossip = list(gossip)  # gossip endpoints; brokers also advertise theirs
        self.concurrency = concurrency
        self.prefetch = concurrency if prefetch is None else prefetch
        self.pool = pool
        self.poll_timeout = poll_timeout
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        _check(self)
        self.handlers: dict[str, Handler] = {}
        self._stop = threading.Event()
        self._done: deque[Outcome] = deque()  # appended by handler threads, drained by the loop
        self._wakeup = Wakeup()

    def handler(self, queue_name: str) -> Callable[[Handler], Handler]:
        """Decorator: run this function for tasks of `queue_name`; it returns bytes or None."""
        check_queue_name(queue_name)
        if len(self.handlers) >= MAX_QUEUES and queue_name not in self.handlers:
            raise ValueError(f"a worker polls at most {MAX_QUEUES} queues")

        def register(fn: Handler) -> Handler:
            self.handlers[queue_name] = fn
            return fn

        return register

    def stop(self) -> None:
        """Finish the tasks in hand, give back the prefetched ones, then return from run()."""
        self._stop.set()
        self._wakeup.set()

    def _finished(self, outcome: Outcome) -> None:
        self._done.append(outcome)
        self._wakeup.set()

    def run(self) -> None:
        if not self.handlers:
            raise ValueError("register at least one handler before run()")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        sys.setswitchinterval(0.0005)  # hand outcomes and deliveries between threads promptly
        runner_type = ProcessRunner if self.pool == "process" else ThreadRunner
        runner = runner_type(self.concurrency, self._finished)
        ctx = zmq.Context()
        try:
            Loop(self, ctx, runner).run()
        finally:
            runner.shutdown()
            ctx.term()


def _check(w: Worker) -> None:
    """What brokers would refuse in every POLL, refused here with the reason (docs/PROTOCOL.md §8)."""
    if not w.endpoints:
        raise ValueError("give at least one broker endpoint")
    if w.concurrency < 1 or w.prefetch < 0 or w.concurrency + w.prefetch > MAX_BATCH:
        raise ValueError(
            f"concurrency must be at least 1, prefetch at least 0, both together at most {MAX_BATCH}"
        )
    if not 0 <= w.poll_timeout <= MAX_POLL_TIMEOUT:
        raise ValueError(f"poll_timeout must be 0 to {MAX_POLL_TIMEOUT:g} seconds, got {w.poll_timeout}")
    if not 1 <= len(w.worker_id) <= MAX_NAME_CHARS:
        raise ValueError(f"worker_id must be 1 to {MAX_NAME_CHARS} characters")
