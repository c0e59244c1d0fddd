"""Where handlers run: a pool of threads, or an event loop for `async def` handlers (processes:
conduit.client.processes).

Each takes (route, task) and hands exactly one Outcome per task to `done`, from whichever thread
finished it. The thread runner is a plain queue and N threads: no futures, little per-task cost,
since for short tasks that overhead is most of a worker's work. A time limit cannot stop a
thread, so a thread past its limit is given up on: its task fails at once, its late result is
refused, a new thread takes its place, and it exits once its handler returns.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable

from conduit.client.context import (
    Outcome,
    Route,
    TaskContext,
    forget,
    invoke,
    invoke_async,
    signal_cancel,
    timed_out,
)
from conduit.logs import log

Done = Callable[[Outcome], None]
logger = logging.getLogger("conduit.worker")


class ThreadRunner:
    def __init__(self, size: int, done: Done) -> None:
        self._jobs: queue.SimpleQueue[tuple[Route, TaskContext] | None] = queue.SimpleQueue()
        self._done = done
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # tasks running under a limit, with their thread
        self._limited: dict[tuple[int, int], tuple[TaskContext, Route, threading.Thread]] = {}
        self._deadlines: list[tuple[float, int, int]] = []  # heap of (deadline, id, attempt)
        self._watch = threading.Condition(self._lock)
        self._watchdog: threading.Thread | None = None
        self._closing = False
        for _ in range(size):
            self._add_thread()

    def _add_thread(self) -> None:
        thread = threading.Thread(target=self._run, name=f"conduit-handler-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def submit(self, route: Route, task: TaskContext) -> None:
        self._jobs.put((route, task))

    def cancel(self, task: TaskContext) -> None:
        signal_cancel(task)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            route, task = job
            if route.time_limit is None:
                self._done(invoke(route.handler, task))
                continue
            key = (task.id, task.attempt)
            with self._lock:
                self._limited[key] = (task, route, threading.current_thread())
                heapq.heappush(self._deadlines, (time.monotonic() + route.time_limit, *key))
                self._start_watchdog()
                self._watch.notify()
            outcome = invoke(route.handler, task)
            with self._lock:
                late = self._limited.pop(key, None) is None
            if late:  # failed already at its limit; a new thread took this one's place
                forget(task)
                log(
                    logger,
                    "warning",
                    "late_result_refused",
                    task=task.id,
                    attempt=task.attempt,
                    ok=outcome.ok,
                )
                return
            self._done(outcome)

    def _start_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._expire, name="conduit-time-limits", daemon=True)
            self._watchdog.start()

    def _expire(self) -> None:
        """Fail each task that outlives its limit, and replace the thread running it."""
        with self._lock:
            while not self._closing:
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, *key = heapq.heappop(self._deadlines)
                    limited = self._limited.pop((key[0], key[1]), None)
                    if limited is not None:
                        task, route, thread = limited
                        signal_cancel(task)
                        self._done(timed_out(task, route, "its thread was abandoned", handler_done=False))
                        self._threads.remove(thread)  # not waited for at shutdown
                        self._add_thread()
                self._watch.wait(self._deadlines[0][0] - now if self._deadlines else None)

    def shutdown(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()
        self.abort()

    def abort(self) -> None:
        """Stop the time-limit watchdog; threads still running handlers are left (daemons)."""
        with self._lock:
            self._closing = True
            self._watch.notify()


class AsyncRunner:
    """`async def` handlers on one event loop in a thread of its own: as many at once as the worker's
    concurrency, with no thread each. A time limit or a lost task cancels the asyncio task."""

    def __init__(self, done: Done) -> None:
        self._done = done
        self._loop = asyncio.new_event_loop()
        self._tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._thread = threading.Thread(target=self._loop.run_forever, name="conduit-asyncio", daemon=True)
        self._thread.start()

    def submit(self, route: Route, task: TaskContext) -> None:
        self._loop.call_soon_threadsafe(self._start, route, task)

    def _start(self, route: Route, task: TaskContext) -> None:
        self._tasks[(task.id, task.attempt)] = self._loop.create_task(self._run(route, task))

    async def _run(self, route: Route, task: TaskContext) -> None:
        try:
            async with asyncio.timeout(route.time_limit):
                outcome = await invoke_async(route.handler, task)
        except TimeoutError:  # the limit's: invoke_async turns the handler's own into a failure
            outcome = timed_out(task, route, "its asyncio task was cancelled")
        except asyncio.CancelledError:  # lost or cancelled: the loop drops this outcome
            outcome = Outcome(task, ok=False, error="CancelledError: the task is not this worker's any more")
        finally:
            self._tasks.pop((task.id, task.attempt), None)
        self._done(outcome)

    def cancel(self, task: TaskContext) -> None:
        self._loop.call_soon_threadsafe(self._cancel, (task.id, task.attempt))

    def _cancel(self, key: tuple[int, int]) -> None:
        running = self._tasks.get(key)
        if running is not None:
            running.cancel()

    def shutdown(self) -> None:
        """Called once nothing runs: stop the loop and close it."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def abort(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
