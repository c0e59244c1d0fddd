"""Where handlers run: a pool of threads, or of processes for CPU-bound work.

Both take (handler, task) and hand each Outcome to `done`, from whichever thread finished it.
The thread runner is a plain queue and N threads: no futures, little per-task cost, since for
short tasks that overhead is most of a worker's work.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from conduit.client.context import Handler, Outcome, TaskContext, invoke

Done = Callable[[Outcome], None]


class ThreadRunner:
    def __init__(self, size: int, done: Done) -> None:
        self._jobs: queue.SimpleQueue[tuple[Handler, TaskContext] | None] = queue.SimpleQueue()
        self._done = done
        self._threads = [
            threading.Thread(target=self._run, name=f"conduit-handler-{i}", daemon=True) for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, handler: Handler, task: TaskContext) -> None:
        self._jobs.put((handler, task))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._done(invoke(*job))

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()


class ProcessRunner:
    def __init__(self, size: int, done: Done) -> None:
        self._size = size
        self._pool = concurrent.futures.ProcessPoolExecutor(size)
        self._done = done

    def submit(self, handler: Handler, task: TaskContext) -> None:
        try:
            future = self._pool.submit(invoke, handler, task)
        except BrokenProcessPool:  # a handler process died: the pool takes nothing more
            self._pool.shutdown(wait=False)  # its tasks have failed through their futures
            self._pool = concurrent.futures.ProcessPoolExecutor(self._size)
            try:
                future = self._pool.submit(invoke, handler, task)
            except RuntimeError as exc:  # no process can be started: fail this task, not the worker
                self._done(Outcome(task, ok=False, error=f"no handler process: {exc!r}"))
                return
        future.add_done_callback(lambda f: self._finished(f, task))

    def _finished(self, future: concurrent.futures.Future[Outcome], task: TaskContext) -> None:
        exc = future.exception()
        # A handler process that died (os._exit, a signal) fails its task rather than losing it.
        self._done(
            future.result()
            if exc is None
            else Outcome(task, ok=False, error=f"handler process died: {exc!r}")
        )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
