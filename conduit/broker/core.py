"""The broker's matching logic as a sans-IO state machine: events in, actions out.

No sockets, no SQL, no clock: the shell feeds it messages, database results and the time, and
carries out the actions it returns. So every rule here (sync match, buffering, group commit,
lease lapses, back-pressure, pauses, shutdown) is tested directly and deterministically.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from conduit.broker.events import (
    Acquired,
    Event,
    Leased,
    LeaseRenewed,
    LookedUp,
    Notified,
    Operated,
    PausedRead,
    PauseSet,
    PeersRead,
    Received,
    SendFailed,
    Shutdown,
    Tallied,
    Tick,
    Written,
)
from conduit.broker.operations import OPERATIONS, Operation, parse_operation
from conduit.broker.pauses import PAUSED_NOTICE, Pauses
from conduit.broker.peers import Peers
from conduit.broker.tally import Tally
from conduit.broker.writes import LANES, REPORTS, SUBMITS, SubmitOp, WriteBatch, WriteResult
from conduit.store import BrokerLease
from conduit.task import Ack, Completion, Failure, LeasedTask, Submitted, TaskSpec
from conduit.wire import (
    Command,
    DeliveryRow,
    ErrorCode,
    Message,
    Poll,
    ProtocolError,
    decode,
    deliver_body,
    encode,
    error_frames,
    parse_acks,
    parse_complete,
    parse_elapsed,
    parse_fail,
    parse_ids,
    parse_poll,
    parse_queue,
    parse_running,
    parse_submit,
    parse_submit_key,
    results_body,
)


@dataclass(frozen=True)
class Config:
    broker_id: str
    endpoint: str = ""
    buffer_size: int = 1000  # tasks buffered per queue at most; the backlog stays in PostgreSQL
    lease_batch: int = 500
    lease_term: float = 10.0  # broker lease; renewed every third of it
    reap_every: float = 1.0
    compact_every: float = 10.0
    prune_every: float = 3600.0  # drop history past the retention, make the coming days' partitions
    idle_recheck: float = 0.5  # how soon a drained queue with waiting pollers is read again
    sync_match_window: float = 5.0  # sync match only this long after a read found no older due task
    max_queued_requests: int = 250  # client writes waiting for the next commit; beyond: "busy"
    max_payload_bytes: int = 1024 * 1024
    pub_endpoint: str = ""  # where this broker's gossip is published ("" for none)
    gossip_every: float = 0.5
    idle_release: float = 2.0  # a buffer nobody polled for this long goes back to the database
    stop_linger: float = 0.5  # after the last commit of a stop, answer everyone this long, then exit


DEMAND_MEMORY = 1.0  # seconds a served poll counts as demand, so prefetch continues between polls
WRITE_RETRY_PAUSE = 0.5  # seconds between write attempts while the database fails
MAX_OPERATIONS = 32  # LIST, PURGE, PAUSE, ... waiting for their database thread; beyond: "busy"
NOTIFY_EVERY = 0.1  # at most one wake-up per queue this often: NOTIFY takes a global lock at commit
GOSSIP_SOONEST = 0.1  # a big change is published at once, but not more often than this
MAX_DELIVERY_BYTES = 8 * 1024 * 1024  # payload bytes in one DELIVER (under the peer's MAXMSGSIZE)


# Requests that settle deliveries: the store call, and the parser building its items.
_SETTLING: dict[Command, tuple[str, Callable[[Message], list[Ack] | list[Completion] | list[Failure]]]] = {
    Command.HEARTBEAT: ("renew", parse_acks),
    Command.COMPLETE: ("complete", parse_complete),
    Command.FAIL: ("fail", parse_fail),
    Command.RELEASE: ("release", parse_acks),
}


# A stopping broker takes on nothing it may not finish: a PAUSE's answer could come after its exit.
_REFUSED_WHEN_STOPPING = frozenset({Command.SUBMIT, Command.POLL, Command.PAUSE, Command.RESUME})


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    peer: bytes
    frames: list[bytes]
    # The tasks in this message, released if it cannot be sent: rows whose first two fields are id
    # and attempt (a DELIVER's rows as they are, not an Ack made for each task it carries).
    delivered: Sequence[Ack | DeliveryRow] = ()


@dataclass(frozen=True)
class Write:
    batch: WriteBatch
    lane: str  # writes.SUBMITS or REPORTS: each lane has a connection, and one commit in flight


@dataclass(frozen=True)
class Lease:
    """Read due tasks into the buffer: leased from the shared backlog, or with `span`, read back
    from this broker's own (already held: no write)."""

    queue: str
    limit: int
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class Lookup:
    peer: bytes
    rid: int
    ids: list[int]


@dataclass(frozen=True)
class Operate:
    peer: bytes
    rid: int
    operation: Operation


@dataclass(frozen=True)
class RenewLease:
    started: float


@dataclass(frozen=True)
class Reacquire:
    pass


@dataclass(frozen=True)
class Reap:
    compact: bool
    prune: bool


@dataclass(frozen=True)
class ReadPaused:
    """Read the paused queues (the keeper's connection)."""


@dataclass(frozen=True)
class SetPaused:
    """Pause or resume a queue for every broker, for a PAUSE or RESUME (the keeper's connection)."""

    peer: bytes
    rid: int
    queue: str
    paused: bool


@dataclass(frozen=True)
class Log:
    level: str
    event: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Publish:
    frames: list[bytes]


@dataclass(frozen=True)
class Stop:
    owner: BrokerLease | None  # lease to drop; None when it was already lost


Action = (
    Send
    | Write
    | Lease
    | Lookup
    | Operate
    | RenewLease
    | Reacquire
    | Reap
    | ReadPaused
    | SetPaused
    | Log
    | Publish
    | Stop
)


# -- state -----------------------------------------------------------------------------------


@dataclass
class _Waiter:
    """A long-poll waiting for tasks."""

    key: int
    peer: bytes
    rid: int
    poll: Poll
    deadline: float
    reserved: int = 0  # tasks sync-matched to it, not yet committed
    reserved_bytes: int = 0  # their payloads
    sealed: bool = False  # its reservations are in the write in flight: it takes no more


@dataclass
class _Queue:
    buffer: deque[LeasedTask] = field(default_factory=deque)
    waiters: deque[int] = field(default_factory=deque)  # keys into Core._waiters, stale ones skipped
    leasing: int = 0  # the limit of the read in flight, 0 when none is
    # Tasks inserted held by this broker that did not fit its buffer, as runs of consecutive ids
    # [lo, hi], every id in a run one of them: read back in id order with no write. A run must not
    # cover any other id this broker holds (delivered, buffered, leased), or that task is read
    # back and runs twice; the id sequence hands each writer blocks of ids, so runs stay long.
    backlog: deque[list[int]] = field(default_factory=deque)
    backlog_count: int = 0
    recheck_at: float = 0.0  # do not read again before this
    drained_at: float | None = None  # when a read last found no more due tasks
    wanted_until: float = 0.0  # polls were served lately: keep the buffer topped up until then
    paused: bool = False  # nothing of it is read, held or delivered (Pauses has the set)


class Core:
    """One broker's in-memory state. Call `handle` with each event; carry out what it returns."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.owner: BrokerLease | None = None
        self.lease_valid_until = 0.0
        self.queues: dict[str, _Queue] = {}
        self._waiters: dict[int, _Waiter] = {}
        self._keys = itertools.count(1)
        self._pending = WriteBatch()
        self._write_after = 0.0  # after a failed write, the next waits a moment
        self._clock = 0.0  # the latest time an event carried
        # Tasks handed out from the buffer stay 'buffered' under the broker lease (no write per
        # delivery): a heartbeat, complete or fail settles them; if none comes within the task's
        # lease timeout, they are expired as failed runs.
        self._delivered: dict[int, tuple[int, str, float, str]] = {}  # id -> attempt, worker, deadline, queue
        self._next_expiry = math.inf  # no delivery's deadline is earlier: ticks skip the scan till then
        self._writing: dict[str, WriteBatch | None] = dict.fromkeys(LANES)  # in flight, by lane
        self._write_started = dict.fromkeys(LANES, 0.0)  # when each lane's write was issued
        self._next_renew = 0.0
        self._renewing = False
        self._next_reap = 0.0
        self._next_compact = 0.0
        self._next_prune = 0.0
        self._stopping = False
        self._stopped_at: float | None = None  # the last commit of a stop is done: nothing more is written
        self._notified_at: dict[str, float] = {}
        self._gossip_seq = 0
        self._next_gossip = 0.0
        self._last_gossip = -1.0
        self._gossiped: frozenset[str] = frozenset()  # queues that had work or polls when last told
        self.peers = Peers()  # the workers heard lately, for WORKERS
        self._operating = 0  # operations sent to the ops thread, not answered yet
        self.tally = Tally()  # what this broker did to tasks, for STATS and metrics
        self._brokers: list[dict[str, str | None]] = []  # the other live brokers, for PONG and GOSSIP
        self.pauses = Pauses()

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        out: list[Action] = []
        if self._stopped_at is not None:
            self._after_stop(event, out)
            return out
        match event:
            case Received(peer, frames, now):
                self._on_message(peer, frames, now, out)
            case Tick(now):
                self._on_tick(now, out)
            case Written(batch, result, error, now):
                self._on_written(batch, result, error, now, out)
            case Leased(queue, tasks, error, now, span):
                self._on_leased(queue, tasks, error, now, out, span)
            case LeaseRenewed(ok, started, now):
                self._on_renewed(ok, started, now, out)
            case PeersRead(peers):
                self._brokers = [{"broker": p.broker, "endpoint": p.endpoint, "pub": p.pub} for p in peers]
            case Acquired(owner, now):
                self.owner = owner
                self.lease_valid_until = now + self.config.lease_term
                self._next_renew = now + self.config.lease_term / 3
                for name in self.queues:
                    self._maybe_lease(name, now, out)
            case LookedUp(peer, rid, _, error) if error is not None:
                out.append(Send(peer, error_frames(ErrorCode.UNAVAILABLE, f"lookup failed: {error}", rid)))
            case LookedUp(peer, rid, infos, _):
                out.append(Send(peer, encode(Command.RESULTS, results_body(rid, infos))))
            case Operated(peer, frames):
                self._operating -= 1
                out.append(Send(peer, frames))
            case SendFailed(peer, delivered):
                out.append(Log("warning", "undeliverable", {"peer": peer.hex(), "tasks": len(delivered)}))
                for task_id, attempt, *_ in delivered:
                    self._delivered.pop(task_id, None)
                    self._pending.releases.append(Ack(task_id, attempt))
            case Shutdown(now):
                self._begin_shutdown(now, out)
            case Tallied(ended):
                self.tally.ended(ended)
            case Notified(queue, now) if queue == PAUSED_NOTICE:
                self.pauses.noticed()
                self._read_paused(now, out)
            case PausedRead(queues, now):
                self._on_paused(*self.pauses.read(queues), now, out)
                self._read_paused(now, out)
            case PauseSet(peer, rid, _, _, error, now) if error is not None:
                self._operating -= 1
                out.append(Send(peer, error_frames(ErrorCode.UNAVAILABLE, f"pause failed: {error}", rid)))
            case PauseSet(peer, rid, changed, queues, _, now):
                self._operating -= 1
                self._on_paused(*self.pauses.apply(queues), now, out)
                outcome = "ok" if changed else "unchanged"
                out.append(Send(peer, encode(Command.ACK, {"rid": rid, "outcomes": [outcome]})))
            case Notified(queue, now):
                if queue in self.queues:
                    self.queues[queue].recheck_at = 0.0
                    self._maybe_lease(queue, now, out)
        self._flush(getattr(event, "now", None), out)
        return out

    # -- requests ----------------------------------------------------------------------------

    def _on_message(self, peer: bytes, frames: list[bytes], now: float, out: list[Action]) -> None:
        try:
            msg = decode(frames)
            self._on_request(peer, msg, now, out)
        except ProtocolError as exc:
            out.append(
                Log("warning", "bad_request", {"peer": peer.hex(), "code": exc.code.value, "error": str(exc)})
            )
            out.append(Send(peer, error_frames(exc.code, str(exc), exc.rid, exc.protocol)))

    def _on_request(self, peer: bytes, msg: Message, now: float, out: list[Action]) -> None:
        rid = msg.rid
        if msg.command is Command.PING:
            body = {
                "rid": rid,
                "broker": self.config.broker_id,
                "pub": self.config.pub_endpoint or None,
                "peers": self._brokers,
            }
            out.append(Send(peer, encode(Command.PONG, body)))
            return
        if (self._stopping and msg.command in _REFUSED_WHEN_STOPPING) or self._stopped_at is not None:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "broker is shutting down; use another", rid)
        if msg.command is Command.RESULT:
            out.append(Lookup(peer, rid, parse_ids(msg)))
            return
        if msg.command in OPERATIONS:
            operation = parse_operation(msg)
            self._start_operation(rid)
            out.append(Operate(peer, rid, operation))
            return
        if msg.command is Command.WORKERS:
            polls = Counter(w.peer for w in self._waiters.values())
            body = self.peers.body(rid, self.config.broker_id, polls, now)
            out.append(Send(peer, encode(Command.WORKER_LIST, body)))
            return
        if msg.command is Command.STATS:
            live = self.owner is not None and now < self.lease_valid_until
            body = self.tally.body(self.depths(), now)
            epoch = self.owner.epoch if self.owner else None
            body |= {"rid": rid, "broker": self.config.broker_id, "epoch": epoch, "lease_valid": live}
            out.append(Send(peer, encode(Command.BROKER_STATS, body)))
            return
        if msg.command is Command.POLL:
            self._on_poll(peer, rid, parse_poll(msg), now, out)
            return
        if msg.command in (Command.PAUSE, Command.RESUME):
            queue = parse_queue(msg)
            self._start_operation(rid)  # bounded like operations: they share the keeper with renewals
            out.append(SetPaused(peer, rid, queue, msg.command is Command.PAUSE))
            return
        if len(self._pending.submits) + len(self._pending.ops) >= self.config.max_queued_requests:
            raise ProtocolError(ErrorCode.BUSY, "broker write queue is full; retry shortly", rid)
        if msg.command is Command.SUBMIT:
            specs = parse_submit(msg, self.config.max_payload_bytes)
            self._on_submit(peer, rid, specs, parse_submit_key(msg), now)
            return
        if msg.command in (Command.CANCEL, Command.RETRY):
            self._pending.add_request(peer, rid, msg.command.lower(), parse_ids(msg))
            return
        kind, parse = _SETTLING[msg.command]
        items = parse(msg)
        if kind == "renew":
            named = msg.body.get("worker")
            running = parse_running(msg)
            self.peers.heartbeat(
                peer, (item.id for item in items), now, named if isinstance(named, str) else None, running
            )
        else:
            self.peers.settled(peer, (item.id for item in items), now)
        elapsed = parse_elapsed(msg, len(items)) if kind in ("complete", "fail") else None
        self._pending.add_request(peer, rid, kind, items, elapsed)

    def _start_operation(self, rid: int) -> None:
        if self._operating >= MAX_OPERATIONS:
            raise ProtocolError(ErrorCode.BUSY, "broker has too many operations running; retry shortly", rid)
        self._operating += 1

    def _on_submit(self, peer: bytes, rid: int, specs: list[TaskSpec], key: str | None, now: float) -> None:
        """Due tasks of a queue at the end of its backlog (no older task due) that this broker has
        demand for are inserted held by it, attempt 1: sync matched to a waiting poll, or for its
        buffer. They are written once, and delivered from memory with no lease write. The rest
        are enqueued, and make the queue read from the database before it holds anything again."""
        waiters: list[int | None] = []
        owned: list[bool] = []
        holdable: dict[str, bool] = {}
        for spec in specs:
            waiter = self._sync_match(spec, now) if spec.delay == 0 else None
            hold = waiter is not None
            if waiter is not None:
                waiter.reserved += 1
                waiter.reserved_bytes += len(spec.payload)
            elif spec.delay == 0:
                if spec.queue not in holdable:
                    holdable[spec.queue] = self._holdable(spec.queue, now)
                hold = holdable[spec.queue]
                if (
                    not hold
                    and now - self._notified_at.get(spec.queue, -NOTIFY_EVERY) >= NOTIFY_EVERY
                    and spec.queue not in self.pauses.queues  # nobody may take it: wake nobody
                ):
                    self._notified_at[spec.queue] = now  # wake brokers whose polls wait on this queue
                    self._pending.notify.append(spec.queue)
            waiters.append(waiter.key if waiter else None)
            owned.append(hold)
        self._pending.submits.append(SubmitOp(peer, rid, specs, waiters, owned, key))

    def _holdable(self, name: str, now: float) -> bool:
        """May tasks just submitted to this queue be held by this broker (in its buffer, or in its own
        backlog past that)? Only at the end of the queue's shared backlog, as for sync match, and
        where polls want them (lately served, or waiting)."""
        q = self.queues.get(name)
        if q is None or q.paused or q.drained_at is None:
            return False
        if now - q.drained_at > self.config.sync_match_window:
            return False
        if self._stopping or self.owner is None or now >= self.lease_valid_until:
            return False
        return now < q.wanted_until or any(key in self._waiters for key in q.waiters)

    def _sync_match(self, spec: TaskSpec, now: float) -> _Waiter | None:
        q = self.queues.get(spec.queue)
        # A re-read in flight on a queue drained moments ago may bring older tasks; they go to the
        # next poll. Waiting for it instead would add a read to every submit's latency.
        if q is None or q.buffer or q.backlog or q.drained_at is None or q.paused:
            return None
        if now - q.drained_at > self.config.sync_match_window:
            return None
        for key in q.waiters:
            waiter = self._waiters.get(key)
            if (
                waiter
                and not waiter.sealed
                and waiter.reserved < waiter.poll.max_tasks
                and waiter.deadline > now
                and (not waiter.reserved or waiter.reserved_bytes + len(spec.payload) <= MAX_DELIVERY_BYTES)
            ):
                return waiter
        return None

    def _on_poll(self, peer: bytes, rid: int, poll: Poll, now: float, out: list[Action]) -> None:
        self.peers.polled(peer, poll, now)
        waiter = _Waiter(next(self._keys), peer, rid, poll, now + poll.timeout)
        self._waiters[waiter.key] = waiter
        for name in poll.queues:
            self._queue(name).waiters.append(waiter.key)
        self._serve(waiter, now, out)
        if waiter.key in self._waiters:
            for name in poll.queues:
                self._maybe_lease(name, now, out)
        if waiter.key in self._waiters and poll.timeout == 0:
            self._finish(waiter, [], out)

    # -- matching buffered tasks to waiting polls --------------------------------------------

    def _serve(self, waiter: _Waiter, now: float, out: list[Action]) -> None:
        if waiter.reserved or not self._lease_live(now, out):
            return
        tasks: list[LeasedTask] = []
        size = 0
        for name in waiter.poll.queues:
            buffer = self._queue(name).buffer  # a paused queue's is empty
            while buffer and len(tasks) < waiter.poll.max_tasks:
                if tasks and size + len(buffer[0].payload) > MAX_DELIVERY_BYTES:
                    break
                size += len(buffer[0].payload)
                tasks.append(buffer.popleft())
        if tasks:
            self.tally.delivered_buffered(tasks, now)
            self._hand_out(waiter, [_delivery(t) for t in tasks], now, out)

    def _hand_out(self, waiter: _Waiter, rows: list[DeliveryRow], now: float, out: list[Action]) -> None:
        """Deliver: held in memory as this broker's until heard of again or expired (a stopping
        broker makes them task leases at once), and the poll's queues count as wanted."""
        for name in waiter.poll.queues:
            self._queue(name).wanted_until = now + DEMAND_MEMORY
        delivered, worker = self._delivered, waiter.poll.worker
        for task_id, attempt, queue, _, _, _, _, lease_timeout in rows:
            delivered[task_id] = (attempt, worker, now + lease_timeout, queue)
        if rows:
            self._next_expiry = min(self._next_expiry, now + min(row[7] for row in rows))
        if self._stopping:
            self._pending.starts.extend(Ack(row[0], row[1]) for row in rows)
        self.peers.delivered(waiter.peer, (row[0] for row in rows))
        self._finish(waiter, rows, out)

    def _serve_queue(self, name: str, now: float, out: list[Action]) -> None:
        q = self._queue(name)
        while q.buffer and q.waiters and not q.paused:
            waiter = self._waiters.get(q.waiters[0])
            if waiter is None or waiter.reserved:
                q.waiters.popleft()
                continue
            self._serve(waiter, now, out)
            if waiter.key in self._waiters:
                break  # the lease lapsed: nothing can be served

    def _finish(self, waiter: _Waiter, tasks: list[DeliveryRow], out: list[Action]) -> None:
        """Answer a poll and forget it; its keys in the queues' waiter lists are skipped later."""
        del self._waiters[waiter.key]
        body = deliver_body(waiter.rid, self.config.broker_id, tasks)
        out.append(Send(waiter.peer, encode(Command.DELIVER, body), tasks))

    def _maybe_lease(self, name: str, now: float, out: list[Action]) -> None:
        """Read the next batch of due tasks when polls wait and the buffer runs low: this broker's
        own backlog first, else the shared one (not before `recheck_at` when it was found empty)."""
        q = self._queue(name)
        if q.leasing or q.paused or self._stopping or self.owner is None:
            return
        if not self._polled(q) and now >= q.wanted_until:
            return
        limit = min(self.config.lease_batch, self.config.buffer_size - len(q.buffer))
        # A queue whose buffer is kept full by tasks held on insert is still read now and then,
        # so that tasks come due in the database (retries, delays) are seen and keep their turn.
        stale = q.drained_at is not None and now - q.drained_at > self.config.sync_match_window / 2
        if limit <= 0 or (len(q.buffer) > self.config.lease_batch // 2 and not stale):
            return
        if q.backlog and not stale:
            q.leasing = limit
            lo, hi = q.backlog[0]
            out.append(Lease(name, limit, (lo, hi)))
        elif now >= q.recheck_at:
            q.leasing = limit
            out.append(Lease(name, limit))

    def _on_leased(
        self,
        name: str,
        tasks: list[LeasedTask],
        error: str | None,
        now: float,
        out: list[Action],
        span: tuple[int, int] | None = None,
    ) -> None:
        q = self._queue(name)
        requested, q.leasing = q.leasing, 0
        if span is not None and error is None:
            self._read_back(q, span, tasks, requested)
        if error is not None:
            q.recheck_at = now + self.config.idle_recheck
            out.append(Log("error", "lease_failed", {"queue": name, "error": error}))
            if span is None and self.owner is not None and not self._stopping:
                # It may have committed before its reply was lost: tasks buffered under this
                # epoch that we never saw, which no reaper returns while the epoch lives.
                out.append(Log("warning", "epoch_fenced", {"epoch": self.owner.epoch}))
                self._fence(out)
            return
        if self._stopping or self.owner is None:
            self._pending.releases.extend(Ack(t.id, t.attempt) for t in tasks)
            return
        if span is not None:
            q.recheck_at = 0.0  # the rest of our own backlog, or the shared one, next
        elif len(tasks) < requested:
            q.drained_at = now
            q.recheck_at = now + self.config.idle_recheck
        else:
            q.recheck_at = 0.0
        q.buffer.extend(tasks)
        if q.paused:  # paused while the read was in flight
            self._hold_nothing(name, q)
            return
        if tasks:  # read for a poll that may have been answered meanwhile: not idle yet
            q.wanted_until = max(q.wanted_until, now + DEMAND_MEMORY)
        self._serve_queue(name, now, out)
        self._maybe_lease(name, now, out)

    def _read_back(self, q: _Queue, span: tuple[int, int], tasks: list[LeasedTask], requested: int) -> None:
        """Advance the backlog span just read: past the last task read, or past the whole span read
        when it held fewer than asked (ids added to it since are still to read)."""
        q.backlog_count = max(0, q.backlog_count - len(tasks))
        if not q.backlog or q.backlog[0][0] != span[0]:
            return  # dropped or released meanwhile
        q.backlog[0][0] = span[1] + 1 if len(tasks) < requested else tasks[-1].id + 1
        if q.backlog[0][0] > q.backlog[0][1]:
            q.backlog.popleft()
        if not q.backlog:
            q.backlog_count = 0  # cancelled tasks leave nothing to count

    def _give_back(self, name: str, q: _Queue) -> None:
        """Release what this broker holds for a queue and has not delivered: buffer and backlog."""
        self._pending.releases.extend(Ack(t.id, t.attempt) for t in q.buffer)
        q.buffer.clear()
        self._pending.spans.extend((name, lo, hi) for lo, hi in q.backlog)
        q.backlog.clear()
        q.backlog_count = 0

    # -- commits -----------------------------------------------------------------------------

    def _flush(self, now: float | None, out: list[Action]) -> None:
        """Group commit: one write in flight in each lane; whatever arrives meanwhile goes in that
        lane's next one."""
        if now is not None:
            self._clock = now
        started = False
        for lane in LANES if self._clock >= self._write_after else ():
            if self._writing[lane] is not None or (batch := self._pending.take(lane)) is None:
                continue
            self._writing[lane] = batch
            self._write_started[lane] = self._clock
            started = True
            for op in batch.submits:  # one delivery per poll: after this commit it is answered
                for key in op.waiters:
                    if key in self._waiters:
                        self._waiters[key].sealed = True
            out.append(Write(batch, lane))
        idle = not started and all(batch is None for batch in self._writing.values())
        if self._stopping and idle and not self._waiters:
            self._stopped_at = self._clock
            out.append(Stop(self.owner))

    def _on_written(
        self, batch: WriteBatch, result: WriteResult | None, error: str | None, now: float, out: list[Action]
    ) -> None:
        lane = SUBMITS if batch.submits else REPORTS  # a lane's batches hold only its writes
        self._writing[lane] = None
        started = self._write_started[lane]
        if result is None:
            requests = batch.requests()
            out.append(Log("error", "write_failed", {"error": error, "requests": len(requests)}))
            for peer, rid in requests:
                out.append(
                    Send(peer, error_frames(ErrorCode.UNAVAILABLE, f"database write failed: {error}", rid))
                )
            for submit in batch.submits:
                for key in {k for k in submit.waiters if k is not None}:
                    self._unreserve(key, now, out)
            self._write_after = now + WRITE_RETRY_PAUSE  # do not hammer a database that is down
            if self.owner is not None and any(any(op.owned) for op in batch.submits):
                # Tasks inserted held may have committed unheard: fence them as after a lease.
                out.append(Log("warning", "epoch_fenced", {"epoch": self.owner.epoch}))
                self._fence(out)
            if self._stopping:  # leave the rest to lease expiry rather than never stop
                out.append(
                    Log(
                        "warning", "bookkeeping_abandoned", {"tasks": len(batch.starts) + len(batch.releases)}
                    )
                )
                return
            # Our own bookkeeping must reach the database, or tasks stay buffered under a live lease.
            self._pending.starts.extend(batch.starts)
            self._pending.expiries.extend(batch.expiries)
            self._pending.releases.extend(batch.releases)
            return
        for op in batch.ops:  # deliveries heard of again, now committed: task leases, or finished
            for item in op.items if op.kind not in ("cancel", "retry") else ():
                if self._delivered.get(item.id, (None,))[0] == item.attempt:
                    del self._delivered[item.id]
        self.tally.committed(batch, result, now - started)
        due = self.tally.wall(started)  # tasks held on insert came due as it began
        for op, outcomes in zip(batch.ops, result.outcomes, strict=True):
            out.append(
                Send(op.peer, encode(Command.ACK, {"rid": op.rid, "outcomes": [str(o) for o in outcomes]}))
            )
        for submit, submitted in zip(batch.submits, result.submitted, strict=True):
            if submitted is None:
                message = f"submit key {submit.key!r} already names a submit of other tasks"
                out.append(Send(submit.peer, error_frames(ErrorCode.INVALID_TASK, message, submit.rid)))
                continue
            ids = [s.id for s in submitted]
            out.append(
                Send(
                    submit.peer,
                    encode(
                        Command.SUBMITTED,
                        {"rid": submit.rid, "ids": ids, "created": [s.created for s in submitted]},
                    ),
                )
            )
            live = not self._stopping and self._lease_live(now, out)
            queues: dict[str, _Queue] = {}  # a submit is nearly always of one queue: look it up once
            buffer_size, releases = self.config.buffer_size, self._pending.releases
            for spec, sub, waiter in zip(submit.specs, submitted, submit.waiters, strict=True):
                q = queues.get(spec.queue)
                if q is None:
                    q = queues[spec.queue] = self._queue(spec.queue)
                if waiter is not None and sub.owned:
                    continue  # delivered below
                if sub.owned and q.paused:  # paused since it was submitted: hold nothing
                    releases.append(Ack(sub.id, 1))
                elif sub.owned and live and (q.backlog or len(q.buffer) >= buffer_size):
                    if q.backlog and sub.id == q.backlog[-1][1] + 1:
                        q.backlog[-1][1] = sub.id
                    else:
                        q.backlog.append([sub.id, sub.id])
                    q.backlog_count += 1
                elif sub.owned and live:
                    q.buffer.append(
                        LeasedTask(
                            sub.id,
                            spec.queue,
                            spec.priority,
                            due,
                            1,
                            0,
                            spec.max_attempts,
                            spec.lease_timeout,
                            bytes(spec.payload),
                        )
                    )
                elif sub.owned:
                    releases.append(Ack(sub.id, 1))
                elif sub.created:
                    q.recheck_at = 0.0  # new work here: the next read need not wait
                    if spec.delay == 0:
                        q.drained_at = None  # a due task waits in the database: read before holding more
        self._deliver_sync_matched(batch, result, now - started, now, out)
        for name in {spec.queue for submit in batch.submits for spec in submit.specs}:
            self._serve_queue(name, now, out)
        for name in list(self.queues):
            self._maybe_lease(name, now, out)

    def _deliver_sync_matched(
        self, batch: WriteBatch, result: WriteResult, commit_seconds: float, now: float, out: list[Action]
    ) -> None:
        by_waiter: dict[int, list[DeliveryRow]] = {}
        for op, submitted in zip(batch.submits, result.submitted, strict=True):
            rows: list[Submitted | None] = [*submitted] if submitted else [None] * len(op.specs)
            for spec, sub, key in zip(op.specs, rows, op.waiters, strict=True):
                if key is not None:
                    tasks = by_waiter.setdefault(key, [])
                    # Not created: a key matched an older task (or submit): nothing new to run.
                    # Not owned: the database found our lease ended; the task waits as pending.
                    if sub is not None and sub.created and sub.owned and spec.queue in self.pauses.queues:
                        self._pending.releases.append(Ack(sub.id, 1))  # paused since it was matched
                    elif sub is not None and sub.created and sub.owned:
                        tasks.append(_sync_delivery(sub.id, spec))
        for key, tasks in by_waiter.items():
            waiter = self._waiters.get(key)
            if waiter is None:  # cannot happen while sealing holds; never leave a task undelivered
                self._pending.releases.extend(Ack(t[0], t[1]) for t in tasks)
                continue
            if tasks:
                self.tally.delivered_sync(tasks, commit_seconds, now)
                self._hand_out(waiter, tasks, now, out)
            else:
                self._unreserve(key, now, out)

    def _unreserve(self, key: int, now: float, out: list[Action]) -> None:
        waiter = self._waiters.get(key)
        if waiter is not None:
            waiter.reserved = waiter.reserved_bytes = 0
            waiter.sealed = False
            self._serve(waiter, now, out)

    # -- time --------------------------------------------------------------------------------

    def _on_tick(self, now: float, out: list[Action]) -> None:
        for waiter in [w for w in self._waiters.values() if w.deadline <= now and not w.reserved]:
            self._finish(waiter, [], out)
        if now >= self._next_expiry:
            expired = [task_id for task_id, (_, _, deadline, _) in self._delivered.items() if deadline <= now]
            for task_id in expired:
                attempt, _, _, _ = self._delivered.pop(task_id)
                self._pending.expiries.append(Ack(task_id, attempt))
            self._next_expiry = min(
                (deadline for _, _, deadline, _ in self._delivered.values()), default=math.inf
            )
        if self.owner is not None and not self._renewing and now >= self._next_renew:
            self._renewing = True
            out.append(RenewLease(now))
        if now >= self._next_reap:
            self._next_reap = now + self.config.reap_every
            compact = now >= self._next_compact
            if compact:
                self._next_compact = now + self.config.compact_every
            prune = now >= self._next_prune
            if prune:
                self._next_prune = now + self.config.prune_every
            out.append(Reap(compact, prune))
            self.peers.forget_silent(now)
        self._read_paused(now, out)
        self._lease_live(now, out)
        for name, q in self.queues.items():
            if len(q.waiters) > 2 * len(self._waiters) + 16:  # answered polls leave their keys behind
                q.waiters = deque(key for key in q.waiters if key in self._waiters)
            self._maybe_lease(name, now, out)
            if (
                (q.buffer or q.backlog)
                and not q.leasing  # what a read brings back would be given back twice
                and now >= q.wanted_until + self.config.idle_release
                and not self._polled(q)
            ):
                # Nobody polls here for these: give them back so brokers with pollers can have them.
                self._give_back(name, q)
        self._gossip(now, out)

    def _read_paused(self, now: float, out: list[Action]) -> None:
        if self.pauses.due(now):
            out.append(ReadPaused())

    def _on_paused(
        self, paused: frozenset[str], resumed: frozenset[str], now: float, out: list[Action]
    ) -> None:
        """A paused queue gives back what this broker holds of it and takes no more; its polls wait
        on (a poll of several queues is served from the others). A resumed one is read at once."""
        for name in paused:
            q = self._queue(name)
            q.paused = True
            if not q.leasing:  # else once the read is back
                self._hold_nothing(name, q)
            out.append(Log("info", "queue_paused", {"queue": name}))
        for name in resumed:
            q = self._queue(name)
            q.paused = False
            q.recheck_at = 0.0
            self._maybe_lease(name, now, out)
            out.append(Log("info", "queue_resumed", {"queue": name}))

    def _hold_nothing(self, name: str, q: _Queue) -> None:
        """Give a paused queue's buffer and own backlog back: pending again, no failure counted.
        They are older than what comes in next, so it is read before anything is held again."""
        self._give_back(name, q)
        q.drained_at = None

    def _polled(self, q: _Queue) -> bool:
        return any(key in self._waiters and not self._waiters[key].reserved for key in q.waiters)

    def _gossip(self, now: float, out: list[Action]) -> None:
        """Publish depths every interval, and at once when a queue gains or loses work or polls."""
        if not self.config.pub_endpoint:
            return
        active = frozenset(  # on every tick: without counting deliveries, thousands in a burst
            name
            for name, q in self.queues.items()
            if q.buffer or q.backlog_count or any(key in self._waiters for key in q.waiters)
        )
        changed = active != self._gossiped and now - self._last_gossip >= GOSSIP_SOONEST
        if now < self._next_gossip and not changed:
            return
        depths = self.depths()
        self._gossiped, self._last_gossip = active, now
        self._next_gossip = now + self.config.gossip_every
        self._gossip_seq += 1
        body = {
            "broker": self.config.broker_id,
            "endpoint": self.config.endpoint,
            "pub": self.config.pub_endpoint,
            "interval": self.config.gossip_every,
            "seq": self._gossip_seq,
            "stopping": self._stopping,
            "peers": self._brokers,
            "queues": {name: list(d) for name, d in depths.items() if name in active or d[2]},
        }
        out.append(Publish(encode(Command.GOSSIP, body)))

    def _on_renewed(self, ok: bool, started: float, now: float, out: list[Action]) -> None:
        self._renewing = False
        if self.owner is None:
            return  # fenced meanwhile: a new epoch is on its way
        if ok:
            self.lease_valid_until = started + self.config.lease_term
            self._next_renew = started + self.config.lease_term / 3
            return
        out.append(Log("error", "broker_lease_lost", {}))  # the shell names the broker
        self._fence(out)

    def _lease_live(self, now: float, out: list[Action]) -> bool:
        """A broker whose lease may have lapsed (it was paused, or cannot renew) delivers nothing more."""
        if self.owner is not None and now < self.lease_valid_until:
            return True
        if self.owner is not None:
            out.append(Log("warning", "broker_lease_lapsed", {"epoch": self.owner.epoch}))
        self._fence(out)
        return False

    def _fence(self, out: list[Action]) -> None:
        """Drop what this broker holds and take a new epoch. What the database still holds under
        the old one (buffered, the own backlog, deliveries not yet heartbeated, held inserts whose
        commit went unheard) is then reaped, instead of staying held by an epoch that lives on."""
        self._drop_buffers(out)
        if self.owner is not None and not self._stopping:
            self.owner = None
            out.append(Reacquire())

    def _drop_buffers(self, out: list[Action]) -> None:
        dropped = sum(len(q.buffer) + q.backlog_count for q in self.queues.values())
        for q in self.queues.values():  # the reaper returns them once the lease has ended
            q.buffer.clear()
            q.backlog.clear()
            q.backlog_count = 0
        if dropped:
            out.append(Log("warning", "buffer_dropped", {"tasks": dropped}))

    # -- shutdown ----------------------------------------------------------------------------

    def _begin_shutdown(self, now: float, out: list[Action]) -> None:
        """Answer waiting polls, give buffered tasks back, commit what is queued, then stop."""
        if self._stopping:
            return
        self._stopping = True
        for waiter in [w for w in self._waiters.values() if not w.reserved]:
            self._finish(waiter, [], out)
        for name, q in self.queues.items():
            self._give_back(name, q)
        # Deliveries outlive this broker as task leases, kept by heartbeats through other brokers.
        self._pending.starts.extend(Ack(i, a) for i, (a, _, _, _) in self._delivered.items())
        self._delivered.clear()
        self._next_gossip = now  # everyone hears at once that we are stopping
        self._gossip(now, out)

    def _after_stop(self, event: Event, out: list[Action]) -> None:
        """Stopped, nothing more is written; until the shell exits, every request is answered
        (PONG, or shutting_down: nothing was done, go elsewhere) so that no peer waits on us, and
        gossip still says we are stopping. Database results still arriving are dropped: what they
        held is released by lease expiry, as after a crash."""
        match event:
            case Received(peer, frames, now):
                self._on_message(peer, frames, now, out)
            case Tick(now):
                self._clock = now
                self._gossip(now, out)

    @property
    def stopped(self) -> bool:
        return self._stopped_at is not None

    def finished(self, now: float) -> bool:
        """Stopped, and lingered long enough for peers to hear of it: the shell may exit."""
        return self._stopped_at is not None and now >= self._stopped_at + self.config.stop_linger

    def _queue(self, name: str) -> _Queue:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = _Queue(paused=name in self.pauses.queues)
        return q

    def depths(self) -> dict[str, tuple[int, int, int]]:
        """Per queue: tasks buffered, polls waiting, and tasks delivered that the database still
        holds as buffered until their first heartbeat (for gossip, and so for status)."""
        delivered = Counter(queue for _, _, _, queue in self._delivered.values())
        return {
            name: (
                len(q.buffer) + q.backlog_count,
                sum(1 for key in q.waiters if key in self._waiters),
                delivered[name],
            )
            for name, q in self.queues.items()
        }


def _delivery(task: LeasedTask) -> DeliveryRow:
    return (
        task.id,
        task.attempt,
        task.queue,
        task.payload,
        task.priority,
        task.failures,
        task.max_attempts,
        task.lease_timeout,
    )


def _sync_delivery(task_id: int, spec: TaskSpec) -> DeliveryRow:
    """Sync-matched: written as delivered, attempt 1, in the commit that acknowledged the submit."""
    return (
        task_id,
        1,
        spec.queue,
        bytes(spec.payload),
        spec.priority,
        0,
        spec.max_attempts,
        spec.lease_timeout,
    )
