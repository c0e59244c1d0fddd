"""Conduit: durable distributed task queues on PostgreSQL and ZeroMQ."""

__version__ = "0.1.0"
