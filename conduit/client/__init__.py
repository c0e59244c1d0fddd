"""Clients of Conduit: Client (and AsyncClient) submit tasks and read results; Worker runs them."""

from conduit.client.aio import AsyncClient
from conduit.client.channel import BrokerError, BrokerTimeout
from conduit.client.client import Client, TaskResult
from conduit.client.context import PermanentError, TaskContext, TimeLimitExceeded
from conduit.client.stats import BrokerStats, QueueStats
from conduit.client.tasks import (
    AsyncTaskHandle,
    Task,
    TaskCancelled,
    TaskFailed,
    TaskHandle,
    current_task,
    task,
    task_ref,
)
from conduit.client.worker import NoHandlers, Worker, WorkerAborted
from conduit.task import Page, TaskDetail, TaskRow, TaskSpec

__all__ = [
    "AsyncClient",
    "AsyncTaskHandle",
    "BrokerError",
    "BrokerStats",
    "BrokerTimeout",
    "Client",
    "NoHandlers",
    "Page",
    "PermanentError",
    "QueueStats",
    "Task",
    "TaskCancelled",
    "TaskContext",
    "TaskDetail",
    "TaskFailed",
    "TaskHandle",
    "TaskResult",
    "TaskRow",
    "TaskSpec",
    "TimeLimitExceeded",
    "Worker",
    "WorkerAborted",
    "current_task",
    "task",
    "task_ref",
]
