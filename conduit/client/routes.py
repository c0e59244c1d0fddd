"""What a worker runs for each queue: one handler taking the raw payload, or tasks called by name.

A queue of one task (the default: a task's queue is its name) routes every delivery to it with
no look at the payload; a queue shared by several tasks reads each payload's name first.
"""

from __future__ import annotations

from typing import Any

from conduit.client.context import NoRetry, Route, TaskContext
from conduit.client.serializers import PayloadError, peek_name
from conduit.client.tasks import Task


class QueueRoutes:
    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.raw: Route | None = None
        self.tasks: dict[str, Route] = {}
        self.only: Route | None = None  # the one route, when there is one

    def add_handler(self, route: Route) -> None:
        if self.tasks:
            raise ValueError(
                f"queue {self.queue!r} runs tasks by name ({self._names()}); give the handler another"
            )
        self.raw = self.only = route

    def add_task(self, task: Task[Any, Any]) -> None:
        if self.raw is not None and not (len(self.tasks) == 1 and task.name in self.tasks):
            raise ValueError(
                f"queue {self.queue!r} already has a handler or a raw task; give {task.name!r} another"
            )
        if task.serializer == "raw" and self.tasks and task.name not in self.tasks:
            raise ValueError(f"raw task {task.name!r} needs queue {self.queue!r} to itself ({self._names()})")
        self.tasks[task.name] = task.route()
        self.only = next(iter(self.tasks.values())) if len(self.tasks) == 1 else None
        if task.serializer == "raw":
            self.raw = self.only

    def route(self, task: TaskContext) -> Route:
        if self.only is not None:
            return self.only
        route = self.tasks.get(peek_name(task.payload) or "")
        return route if route is not None else Route(self._unknown)

    def kinds(self) -> set[bool]:
        """is_async of its routes: {True}, {False} or both."""
        return {r.is_async for r in (*self.tasks.values(), *([self.raw] if self.raw else []))}

    def _unknown(self, task: TaskContext) -> None:
        name = peek_name(task.payload)
        what = f"no task named {name!r}" if name else "a payload that is not a call by name"
        raise NoRetry(
            PayloadError(f"queue {self.queue!r} got {what}; this worker runs {self._names()} there")
        )

    def _names(self) -> str:
        return ", ".join(sorted(self.tasks)) or "a raw handler"
