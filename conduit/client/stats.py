"""What `Client.stats()` returns: one broker's STATS reply (docs/PROTOCOL.md §6.5d), as objects.

A broker answers from memory, so these are cheap to ask for every second (`conduit top` does).
Totals count since that broker started; a restarted broker starts again from zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QueueStats:
    """One queue as one broker sees it."""

    buffered: int  # tasks it holds for the queue, not yet delivered (its buffer and own backlog)
    polls: int  # workers' polls waiting for the queue there now
    submitted: int  # tasks created by submits through it, since it started
    delivered: int  # tasks it sent to workers
    completed: int  # tasks its commits completed
    failed: int  # failed runs it recorded (retried or not)
    dead: int  # tasks its commits made dead
    latency_p50: float | None  # seconds from run_at to delivery, over the last minute; None: none
    latency_p99: float | None


@dataclass(frozen=True)
class BrokerStats:
    broker: str  # its id
    endpoint: str  # where it was asked
    epoch: int | None  # its broker lease's epoch; None while it has none (taking a new one)
    lease_valid: bool  # False: it may not deliver (its lease lapsed or is being renewed late)
    queues: dict[str, QueueStats]  # every queue it has seen since it started


def parse_stats(endpoint: str, body: dict[str, Any]) -> BrokerStats:
    columns = [
        body[name]
        for name in (
            "buffered",
            "polls",
            "submitted",
            "delivered",
            "completed",
            "failed",
            "dead",
            "latency_p50",
            "latency_p99",
        )
    ]
    queues = {str(name): QueueStats(*row) for name, *row in zip(body["queue"], *columns, strict=True)}
    epoch = body.get("epoch")
    return BrokerStats(
        str(body["broker"]),
        endpoint,
        None if epoch is None else int(epoch),
        bool(body["lease_valid"]),
        queues,
    )
