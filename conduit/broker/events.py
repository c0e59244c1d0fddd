"""Events the broker shell feeds the core: messages, the time, and what the database answered."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from conduit.broker.writes import WriteBatch, WriteResult
from conduit.store import BrokerLease, Peer
from conduit.task import Ack, LeasedTask, TaskInfo
from conduit.wire import DeliveryRow


@dataclass(frozen=True)
class Received:
    peer: bytes
    frames: list[bytes]
    now: float


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class Written:
    """A group commit ended: `result` when it committed, `error` when it did not."""

    batch: WriteBatch
    result: WriteResult | None
    error: str | None
    now: float


@dataclass(frozen=True)
class Leased:
    queue: str
    tasks: list[LeasedTask]
    error: str | None
    now: float
    span: tuple[int, int] | None = None  # read back from this broker's own backlog


@dataclass(frozen=True)
class LeaseRenewed:
    ok: bool
    started: float  # when the renewal was sent: the lease is good for a term from then
    now: float


@dataclass(frozen=True)
class Acquired:
    owner: BrokerLease
    now: float


@dataclass(frozen=True)
class LookedUp:
    peer: bytes
    rid: int
    infos: list[TaskInfo]
    error: str | None


@dataclass(frozen=True)
class Operated:
    """The reply to an operation (conduit.broker.operations), or the error that ended it."""

    peer: bytes
    frames: list[bytes]


@dataclass(frozen=True)
class SendFailed:
    peer: bytes
    delivered: Sequence[Ack | DeliveryRow]  # rows whose first two fields are id and attempt


@dataclass(frozen=True)
class Shutdown:
    now: float


@dataclass(frozen=True)
class Notified:
    """Another broker (or an application's enqueue()) committed due tasks to this queue."""

    queue: str
    now: float


@dataclass(frozen=True)
class Tallied:
    """Tasks the reaper failed or made dead, per ending and queue (Store.take_ended), for the tally."""

    ended: dict[str, dict[str, int]]


@dataclass(frozen=True)
class PeersRead:
    """The other live brokers, read with each lease renewal: PONG and GOSSIP name them."""

    peers: tuple[Peer, ...]


@dataclass(frozen=True)
class PausedRead:
    """The paused queues as the database holds them; None when the read failed."""

    queues: frozenset[str] | None
    now: float


@dataclass(frozen=True)
class PauseSet:
    """A PAUSE or RESUME ran: whether it changed anything and the paused set after it, or why not."""

    peer: bytes
    rid: int
    changed: bool
    queues: frozenset[str] | None
    error: str | None
    now: float


Event = (
    Received
    | Tick
    | Written
    | Leased
    | LeaseRenewed
    | Acquired
    | LookedUp
    | Operated
    | SendFailed
    | Shutdown
    | Notified
    | Tallied
    | PeersRead
    | PausedRead
    | PauseSet
)
