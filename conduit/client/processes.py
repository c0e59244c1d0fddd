"""Handlers in processes of their own, for CPU-bound work: one process per slot, each slot served
by a thread that hands it one task at a time and waits for its outcome.

A slot is what lets a time limit end the very process that runs the task (a pool of futures
cannot say which process that is): the slot's thread waits up to the limit, then kills its
process, fails the task and starts a new one. A process that dies by itself (os._exit, a signal)
fails its task the same way, so no task is lost with it. Each slot has one cancellation event,
shared with its process and cleared before each task, so telling a handler its task was lost
costs nothing per task.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import threading
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

from conduit.client import context
from conduit.client.context import Outcome, Route, TaskContext, invoke, timed_out
from conduit.client.runners import Done

_mp = multiprocessing.get_context()
# Slots fork from threads of their own. A process forked while another slot's pipe is open at
# both ends in the worker keeps a copy of that pipe's far end: when that slot's process died, its
# thread never saw EOF and waited forever (a task left running, a worker that would not stop).
_forking = threading.Lock()
ORPHAN_CHECK = 1.0  # seconds between a handler process's checks that its worker still lives


def _serve(conn: Connection, event: Event, worker: int) -> None:
    """A handler process: run what the slot sends until it sends None, or until the worker is gone
    (other handler processes may hold copies of this pipe, so its end is not always seen)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to act on, not ours
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    context._process_event = event
    while True:
        if not conn.poll(ORPHAN_CHECK):
            if os.getppid() != worker:
                return
            continue
        if (job := conn.recv()) is None:
            return
        handler, task = job
        conn.send(invoke(handler, task))


class _Slot:
    def __init__(self, runner: ProcessRunner, number: int) -> None:
        self.runner = runner
        self.event = _mp.Event()
        self.lock = threading.Lock()
        self.task: tuple[int, int] | None = None
        self.process: Any = None
        self.conn: Connection | None = None
        self.limit_hit = False  # the running task's process was ended at its time limit
        self.thread = threading.Thread(target=self.serve, name=f"conduit-process-{number}", daemon=True)

    def start_process(self) -> Connection:
        with _forking:  # no other slot forks while this pipe's far end is open here
            ours, theirs = _mp.Pipe()
            self.process = _mp.Process(target=_serve, args=(theirs, self.event, os.getpid()), daemon=True)
            self.process.start()
            theirs.close()
        self.conn = ours
        return ours

    def end_process(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
        if self.process is not None:
            self.process.join(5)
        if self.conn is not None:
            self.conn.close()

    def serve(self) -> None:
        conn = self.start_process()
        while (job := self.runner.jobs.get()) is not None:
            route, task = job
            with self.lock:
                self.task = (task.id, task.attempt)
                self.event.clear()
            outcome = self.run(conn, route, task)
            with self.lock:
                self.task = None
            if outcome is None:  # its process ended: a new one for the next task
                outcome = self.died(task, route)
                self.end_process()
                conn = self.start_process()
            self.runner.done(outcome)
        with contextlib.suppress(OSError):
            conn.send(None)
        self.process.join(5)
        self.end_process()

    def run(self, conn: Connection, route: Route, task: TaskContext) -> Outcome | None:
        """The task's outcome, or None if its process died or was ended at the time limit."""
        self.limit_hit = False
        try:
            conn.send((route.handler, task))
            if not conn.poll(route.time_limit):
                self.limit_hit = True
                self.process.kill()
                return None
            outcome: Outcome = conn.recv()
            return outcome
        except (EOFError, OSError):
            return None

    def died(self, task: TaskContext, route: Route) -> Outcome:
        if self.limit_hit:
            return timed_out(task, route, "its process was ended")
        self.process.join(5)
        code = self.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return Outcome(task, ok=False, error=f"handler process died: {how}")

    def cancel(self, key: tuple[int, int]) -> None:
        with self.lock:
            if self.task == key:
                self.event.set()


class ProcessRunner:
    def __init__(self, size: int, done: Done) -> None:
        self.jobs: queue.SimpleQueue[tuple[Route, TaskContext] | None] = queue.SimpleQueue()
        self.done = done
        self._slots = [_Slot(self, i) for i in range(size)]
        for slot in self._slots:
            slot.thread.start()

    def submit(self, route: Route, task: TaskContext) -> None:
        self.jobs.put((route, task))

    def cancel(self, task: TaskContext) -> None:
        for slot in self._slots:
            slot.cancel((task.id, task.attempt))

    def shutdown(self) -> None:
        for _ in self._slots:
            self.jobs.put(None)
        for slot in self._slots:
            slot.thread.join()

    def abort(self) -> None:
        """Stop at once: every handler process is killed."""
        for slot in self._slots:
            with contextlib.suppress(Exception):
                slot.process.kill()
