"""Clients of Conduit: Client submits tasks and reads results; Worker runs handlers."""

from conduit.client.channel import BrokerError, BrokerTimeout
from conduit.client.client import Client, TaskResult
from conduit.client.context import PermanentError, TaskContext
from conduit.client.worker import Worker

__all__ = ["BrokerError", "BrokerTimeout", "Client", "PermanentError", "TaskContext", "TaskResult", "Worker"]
