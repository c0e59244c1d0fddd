"""conduit.client.Worker: long-polls a broker, runs handlers concurrently, heartbeats, reports back.

One thread owns the sockets and all bookkeeping (conduit.client.loop); handlers run in a thread
or process pool, `async def` ones on an event loop, and hand their outcomes back through a queue
and a wake-up pipe. Completions are resent until the broker acknowledges their commit, so a
finished task is not run again for nothing.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from conduit.client.context import Handler, Outcome, Route
from conduit.client.link import LIVENESS
from conduit.client.loop import Loop
from conduit.client.metrics import WorkerMetrics
from conduit.client.processes import ProcessRunner
from conduit.client.routes import QueueRoutes
from conduit.client.runners import AsyncRunner, ThreadRunner
from conduit.client.tasks import Task
from conduit.client.typecheck import unencodable
from conduit.client.wakeup import Wakeup
from conduit.curve import ClientCurve, client_context
from conduit.errors import ConduitError
from conduit.logs import log
from conduit.task import check_queue_name
from conduit.wire import MAX_BATCH, MAX_NAME_CHARS, MAX_POLL_TIMEOUT, MAX_QUEUES

logger = logging.getLogger("conduit.worker")


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
        curve: ClientCurve | None = None,
    ) -> None:
        """`heartbeat_interval` keeps task leases alive (a database write); `liveness` is how
        soon a quiet broker is PINGed, and twice it how soon it is left for another. `curve`: as
        the Client's (by default from CONDUIT_CURVE_SECRET and CONDUIT_CURVE_SERVER when set)."""
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self.gossip = list(gossip)  # gossip endpoints; brokers also advertise theirs
        self.concurrency = concurrency
        self.prefetch = concurrency if prefetch is None else prefetch
        self.pool = pool
        self.poll_timeout = poll_timeout
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.curve = curve  # None: from the environment, read when it runs
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        _check(self)
        self.routes: dict[str, QueueRoutes] = {}
        self._stop = threading.Event()
        self._done: deque[Outcome] = deque()  # appended by handler threads, drained by the loop
        self._wakeup = Wakeup()
        self.metrics = WorkerMetrics()  # what `conduit worker --metrics` serves

    def handler(self, queue_name: str, *, time_limit: float | None = None) -> Callable[[Handler], Handler]:
        """Decorator: run this function (or `async def`) for tasks of `queue_name`, with the task's
        TaskContext; it returns bytes or None. Past `time_limit` seconds the task fails."""

        def register(fn: Handler) -> Handler:
            problem = unencodable(fn, "raw")
            if problem:
                raise TypeError(f"the handler for queue {queue_name!r} {problem} (or define it with @task)")
            if time_limit is not None and not 0 < time_limit < 1e9:
                raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit}")
            route = Route(fn, inspect.iscoroutinefunction(fn), time_limit)
            self._queue(queue_name).add_handler(route)
            return fn

        self._queue(queue_name)  # a bad name fails here, before the function
        return register

    def register(self, *tasks: Task[Any, Any]) -> None:
        """Run these tasks (made with @task), each on its queue."""
        for t in tasks:
            if not isinstance(t, Task) or t.fn is None:
                raise TypeError(f"{t!r} is not a task with a function: make it with @task")
            self._queue(t.queue).add_task(t)

    def _queue(self, name: str) -> QueueRoutes:
        check_queue_name(name)
        if name not in self.routes:
            if len(self.routes) >= MAX_QUEUES:
                raise ValueError(f"a worker polls at most {MAX_QUEUES} queues")
            self.routes[name] = QueueRoutes(name)
        return self.routes[name]

    @property
    def queues(self) -> list[str]:
        return [q for q, r in self.routes.items() if r.only is not None or r.tasks]

    def stop(self) -> None:
        """Finish the tasks in hand, give back the prefetched ones, then return from run()."""
        self._stop.set()
        self._wakeup.set()

    def _finished(self, outcome: Outcome) -> None:
        self._done.append(outcome)
        self._wakeup.set()

    def _signalled(self, signum: int, _frame: object) -> None:
        """The first SIGINT or SIGTERM stops gracefully; a second one stops at once."""
        if self._stop.is_set():
            raise WorkerAborted("stopped at once: the tasks it held run again once their leases expire")
        log(logger, "info", "stopping", signal=signal.Signals(signum).name, hint="a second one stops at once")
        self.stop()

    def run(self) -> None:
        """Serve until stop() or a signal; raises WorkerAborted on a second signal."""
        if not self.queues:
            raise NoHandlers("the worker has no handlers: register a task (worker.register) or a handler")
        curve = self.curve or ClientCurve.load()  # a bad key file fails here, before anything starts
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._signalled)
            signal.signal(signal.SIGINT, self._signalled)
        sys.setswitchinterval(0.0005)  # hand outcomes and deliveries between threads promptly
        kinds = set().union(*(r.kinds() for r in self.routes.values()))
        if False in kinds:
            runner_type = ProcessRunner if self.pool == "process" else ThreadRunner
            runner = runner_type(self.concurrency, self._finished)
        else:  # async only: one thread, for what fails before reaching a handler (an unknown name)
            runner = ThreadRunner(1, self._finished)
        aio = AsyncRunner(self._finished) if True in kinds else None
        log(
            logger,
            "info",
            "worker_started",
            worker=self.worker_id,
            brokers=",".join(self.endpoints),
            queues=",".join(self.queues),
            concurrency=self.concurrency,
            pool=self.pool + ("+asyncio" if aio else ""),
            curve="on" if curve else "off",
        )
        ctx = client_context(curve)
        try:
            Loop(self, ctx, runner, aio).run()
        except WorkerAborted:
            runner.abort()
            if aio:
                aio.abort()
            raise
        else:
            runner.shutdown()
            if aio:
                aio.shutdown()
        finally:
            ctx.term()
        log(logger, "info", "worker_stopped", worker=self.worker_id)


class NoHandlers(ConduitError):
    """Worker.run() with nothing to run."""


class WorkerAborted(ConduitError):
    """A second SIGINT or SIGTERM stopped the worker without waiting for its tasks."""


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
