"""What a task is, and the rules a submitted task must keep, shared by the client, broker and store."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from conduit.errors import InvalidTask

QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
MAX_KEY_LENGTH = 200
PRIORITY_RANGE = (-32768, 32767)
MAX_ATTEMPTS = 2**31 - 1  # the attempt is a PostgreSQL integer
MAX_SECONDS = 100 * 365 * 86400.0  # delays, leases and backoffs beyond a century are mistakes
LIVE_STATES = ("pending", "buffered", "running")
FINAL_STATES = ("completed", "dead", "cancelled")
STATES = (*LIVE_STATES, *FINAL_STATES)


class TaskSpec(NamedTuple):
    """A task to enqueue. Lower priority runs first; `delay` is seconds from the commit.

    This and the other per-task records are NamedTuples: immutable, and built several times
    faster than frozen dataclasses, which matters at tens of thousands of tasks a second."""

    queue: str
    payload: bytes
    priority: int = 0
    delay: float = 0.0
    max_attempts: int = 5
    lease_timeout: float = 30.0
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    idempotency_key: str | None = None

    def validate(self, max_payload_bytes: int) -> None:
        """Raise InvalidTask naming the rule broken, before anything is written."""
        check_queue_name(self.queue)
        if not isinstance(self.payload, (bytes, bytearray, memoryview)):
            raise InvalidTask(f"payload must be bytes, got {type(self.payload).__name__}")
        if len(self.payload) > max_payload_bytes:
            raise InvalidTask(
                f"payload of {len(self.payload)} bytes exceeds the limit of {max_payload_bytes}; "
                "store large data elsewhere and pass a reference (a URL or key) instead"
            )
        low, high = PRIORITY_RANGE
        if not low <= self.priority <= high:
            raise InvalidTask(f"priority {self.priority} is outside {low}..{high}")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise InvalidTask(f"max_attempts must be 1..{MAX_ATTEMPTS}, got {self.max_attempts}")
        # One chained test for the common case; comparisons are false for NaN, and infinities fail.
        if not (
            0 <= self.delay <= MAX_SECONDS
            and 0 < self.lease_timeout <= MAX_SECONDS
            and 0 <= self.backoff_base <= MAX_SECONDS
            and 0 <= self.backoff_max <= MAX_SECONDS
        ):
            for name in ("delay", "lease_timeout", "backoff_base", "backoff_max"):
                value = getattr(self, name)
                if not 0 <= value <= MAX_SECONDS:
                    raise InvalidTask(
                        f"{name} must be a number of seconds from 0 to {MAX_SECONDS:g}, got {value}"
                    )
            raise InvalidTask("lease_timeout must be more than 0 seconds")
        key = self.idempotency_key
        if key is not None and (not 0 < len(key) <= MAX_KEY_LENGTH or "\x00" in key):
            raise InvalidTask(f"idempotency key must be 1 to {MAX_KEY_LENGTH} characters, none of them NUL")


_valid_queues: set[str] = set()  # names seen valid: most submits repeat a few; bounded below


def check_queue_name(queue: str) -> None:
    if isinstance(queue, str) and queue in _valid_queues:
        return
    if not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue):
        raise InvalidTask(
            f"queue name {queue!r} is not valid: 1-64 characters, letters, digits and _ . : -, "
            "starting with a letter or digit"
        )
    if len(_valid_queues) < 10_000:
        _valid_queues.add(queue)


class Submitted(NamedTuple):
    """The id a submit got, and whether it created the task (False: an idempotency key matched)."""

    id: int
    created: bool
    owned: bool = False  # inserted held by the submitting broker, for it to deliver from memory


class LeasedTask(NamedTuple):
    """A task leased into a broker's buffer; `attempt` is the fencing token its delivery carries."""

    id: int
    queue: str
    priority: int
    run_at: datetime | None  # when it came due; held on insert: when the insert began (broker's clock)
    attempt: int
    failures: int
    max_attempts: int
    lease_timeout: float
    payload: bytes


class Ack(NamedTuple):
    """One delivery's claim on a task: its id and the attempt it was delivered with."""

    id: int
    attempt: int


class Completion(NamedTuple):
    id: int
    attempt: int
    result: bytes | None = None


class Failure(NamedTuple):
    id: int
    attempt: int
    error: str
    retry: bool = True


class Outcome(enum.StrEnum):
    """What became of a fenced write, per task; anything but OK changed nothing."""

    OK = "ok"
    STALE = "stale"  # another delivery holds the task now, or its lease was reaped
    FINISHED = "finished"  # completed or dead already
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"
    LIVE = "live"  # a retry refused: the task has not ended


@dataclass(frozen=True)
class TaskInfo:
    """Where a task stands: a live state (pending, buffered, running) or a final one."""

    id: int
    state: str | None  # None: no such task
    attempt: int | None
    result: bytes | None
    error: str | None
    finished_at: datetime | None


@dataclass(frozen=True)
class TaskRow:
    """One line of a listing. `since`: when a live task came due (run_at), or a finished one ended."""

    id: int
    queue: str
    state: str
    priority: int | None  # None: completed in a batch row, which keeps no priority
    attempt: int
    failures: int
    since: datetime
    broker: str | None  # the broker holding a live task
    error: str | None


@dataclass(frozen=True)
class Page:
    rows: list[TaskRow]
    next: str | None  # pass as `after` for the next page; None: this was the last


@dataclass(frozen=True)
class TaskDetail:
    id: int
    queue: str
    state: str
    priority: int | None
    attempt: int
    failures: int
    max_attempts: int | None
    lease_timeout: float | None
    backoff_base: float | None
    backoff_max: float | None
    run_at: datetime | None
    lease_expires_at: datetime | None
    broker: str | None
    idempotency_key: str | None
    payload: bytes | None  # live tasks, and dead or cancelled ones (kept to retry)
    result: bytes | None
    error: str | None
    finished_at: datetime | None
