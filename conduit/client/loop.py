"""The Python Worker's loop: one thread owns the sockets and all bookkeeping (conduit.client.worker).

It keeps one long-poll outstanding for as much room as it has, starts what it holds, heartbeats
every task it holds, sends reports until their commit is acknowledged, and leaves a broker that
went quiet or dropped it (docs/PROTOCOL.md §11) for another (conduit.client.switching).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import zmq

from conduit.client.context import TaskContext, contexts, forget
from conduit.client.link import Link
from conduit.client.mesh import Mesh
from conduit.client.processes import ProcessRunner
from conduit.client.runners import AsyncRunner, ThreadRunner
from conduit.client.switching import awaited, check_brokers, choose_broker, failover, give_up
from conduit.logs import Outage, log
from conduit.wire import (
    MAX_BATCH,
    MAX_HOST_CHARS,
    REPLIES,
    Command,
    ErrorCode,
    Message,
    ProtocolError,
    decode,
    encode,
    parse_deliver,
    report_body,
)

if TYPE_CHECKING:
    from conduit.client.worker import Worker

logger = logging.getLogger("conduit.worker")
RESEND_AFTER = 5.0  # seconds without an ACK before a complete or fail is sent again
MAX_UNACKED = 2  # report messages awaiting their commit; later outcomes wait and go together
REFUSED_PAUSE = 0.1  # after a refusal (busy, database down), wait this long before sending again
STOP_GRACE = 30.0  # on stop, how long to keep resending unacknowledged reports before giving up
# Brokers' silence counts in heartbeats (seconds), so it is checked every 10 ms, not on every turn:
# in a burst the loop turns once a task or two, and each check polled every link's sockets.
CHECK_EVERY = 0.01


class Loop:
    """The worker's bookkeeping, owned by one thread."""

    def __init__(
        self,
        worker: Worker,
        ctx: zmq.Context[Any],
        runner: ThreadRunner | ProcessRunner,
        aio: AsyncRunner | None = None,
    ) -> None:
        self.w = worker
        self.ctx = ctx
        self.runner = runner
        self.aio = aio  # for async def handlers
        self.routes = worker.routes
        self.queues = worker.queues
        # Who this worker is, in every POLL, for WORKERS (`conduit workers`).
        host = socket.gethostname()[:MAX_HOST_CHARS] or None  # nil: not sent
        self.identity = {"host": host, "pid": os.getpid(), "concurrency": worker.concurrency}
        self.poller = zmq.Poller()
        self.poller.register(worker._wakeup.fd, zmq.POLLIN)
        self.mesh = Mesh(ctx, worker.endpoints, worker.gossip)
        self.poller.register(self.mesh.sub, zmq.POLLIN)
        self.links: dict[str, Link] = {}  # one DEALER per broker used
        self.current = worker.endpoints[0]  # where polls, heartbeats and reports go
        self.last_poll_empty = False
        self.rids = iter(range(1, 2**63))
        self.poll_rid: int | None = None
        self.poll_deadline = 0.0
        self.prefetched: deque[TaskContext] = deque()
        self.running: dict[int, TaskContext] = {}
        self.started: dict[int, float] = {}  # when each running task was handed to a handler
        self.metrics = worker.metrics
        self.lost: set[tuple[int, int]] = set()  # running, but the lease is another's: result dropped
        # Reports are rows, (id, attempt, ...) as report_body takes them; rid -> what, rows, when
        # sent, and to which broker
        self.unacked: dict[int, tuple[Command, list[tuple[Any, ...]], float, str]] = {}
        self.outbox: dict[Command, list[tuple[Any, ...]]] = {
            Command.COMPLETE: [],
            Command.FAIL: [],
            Command.RELEASE: [],
        }
        self.hold_until = 0.0
        self.next_heartbeat = 0.0
        self.heartbeats: dict[int, list[tuple[int, int]]] = {}  # the last heartbeat's rid and rows
        self.heartbeat_to = self.current  # ... and its broker
        self.heartbeat_misses = 0
        self.unpinged = set(worker.endpoints)  # to ask where they gossip, until they answer
        self.next_discovery = 0.0
        self.next_check = 0.0
        self.wrong_version: set[str] = set()  # brokers of another protocol version, told once
        self.alone_failovers = 0  # in a row, with no other broker to go to: polls back off
        self.poll_after = 0.0
        self.outage = Outage(logger, "broker")

    def link(self, endpoint: str) -> Link:
        if endpoint not in self.links:
            self.links[endpoint] = Link(self.ctx, endpoint, self.w.liveness)
            self.poller.register(self.links[endpoint].sock, zmq.POLLIN)
        return self.links[endpoint]

    def send(
        self, command: Command, body: dict[str, Any], endpoint: str | None = None, wait: bool = True
    ) -> int | None:
        """Send (to the current broker by default), waiting up to 1 s for a connection if `wait`
        (not at all once the broker is known to be down); None if there is none (the caller
        tries again)."""
        link = self.link(endpoint or self.current)
        if link.endpoint not in awaited(self):
            link.begin(time.monotonic())
        rid = next(self.rids)
        frames = encode(command, {**body, "rid": rid})
        try:
            link.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            if not wait or not link.writable(1.0):
                return None
            link.sock.send_multipart(frames, zmq.NOBLOCK)
        return rid

    def flush(self) -> None:
        """Send outcomes that must be acknowledged after their commit; resent until they are. With a
        few reports unacknowledged, new outcomes wait and then go together (batching under load)."""
        now = time.monotonic()
        for command, rows in self.outbox.items():
            while rows and len(self.unacked) < MAX_UNACKED and now >= self.hold_until:
                batch, self.outbox[command] = rows[:MAX_BATCH], rows[MAX_BATCH:]
                rows = self.outbox[command]
                rid = self.send(command, report_body(command, batch))
                self.unacked[rid if rid is not None else -next(self.rids)] = (
                    command,
                    batch,
                    now,
                    self.current,
                )

    def requeue(self, rid: int) -> None:
        command, rows, _, _ = self.unacked.pop(rid)
        self.outbox[command][:0] = rows

    def run(self) -> None:
        try:
            self.loop()
        finally:  # sockets closed even on an error, so the context can terminate
            for link in self.links.values():
                link.close()
            self.mesh.close()

    def loop(self) -> None:
        poller = self.poller
        stop_by: float | None = None
        while True:
            if self.w._stop.is_set():
                stop_by = stop_by or time.monotonic() + STOP_GRACE
                unsettled = self.pending_reports() or self.poll_rid is not None
                if not self.running and (not unsettled or time.monotonic() > stop_by):
                    if unsettled:  # the broker never answered: leases expire, the tasks run again
                        log(logger, "warning", "stopped_unacknowledged", reports=len(self.unacked))
                    return
            self.step_out()
            self.flush()
            ready = dict(poller.poll(100))
            if self.w._wakeup.fd in ready:
                self.w._wakeup.drain()  # then collect: an outcome racing the drain is seen below
            if self.mesh.sub in ready:
                self.mesh.update()
            for link in [link for link in self.links.values() if link.sock in ready]:
                self.receive(link)
            self.collect()
            self.metrics.running, self.metrics.prefetched = len(self.running), len(self.prefetched)
            if (now := time.monotonic()) >= self.next_check:
                self.next_check = now + CHECK_EVERY
                check_brokers(self)

    def step_out(self) -> None:
        """Start what can run, give back what will not, ask for more, heartbeat."""
        now = time.monotonic()
        if self.unpinged and now >= self.next_discovery:  # where do they gossip? (learn the mesh)
            self.next_discovery = now + self.w.heartbeat_interval
            for endpoint in self.unpinged:
                self.send(Command.PING, {}, endpoint, wait=False)
        while self.prefetched and len(self.running) < self.w.concurrency and not self.w._stop.is_set():
            task = self.prefetched.popleft()
            self.running[task.id] = task
            self.started[task.id] = now
            route = self.routes[task.queue].route(task)
            (self.aio if route.is_async and self.aio else self.runner).submit(route, task)
        if self.w._stop.is_set() and self.prefetched:
            self.outbox[Command.RELEASE].extend((t.id, t.attempt) for t in self.prefetched)
            self.prefetched.clear()
        room = self.w.concurrency + self.w.prefetch - len(self.running) - len(self.prefetched)
        if self.poll_rid is None and room > 0 and not self.w._stop.is_set() and now >= self.poll_after:
            choose_broker(self)
            body = {"worker": self.w.worker_id, "queues": self.queues, "max": room, **self.identity}
            self.poll_rid = self.send(Command.POLL, {**body, "timeout": self.w.poll_timeout})
            self.poll_deadline = now + self.w.poll_timeout + 5
            if self.poll_rid is None:  # no connection: try the next broker
                failover(self)
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.w.heartbeat_interval
            held = [
                (t.id, t.attempt)
                for t in (*self.running.values(), *self.prefetched)
                if (t.id, t.attempt) not in self.lost
            ]
            # An unanswered heartbeat is a broker gone or cut off: after two, keep the task leases
            # alive through another broker before they expire (heartbeats are our liveness probe).
            missed = self.heartbeats and self.heartbeat_to == self.current
            self.heartbeat_misses = self.heartbeat_misses + 1 if missed else 0
            if self.heartbeat_misses >= 2:
                self.heartbeat_misses = 0
                failover(self)
            if held:  # one that cannot even be sent (no connection) counts as unanswered
                # Sent while the last is still awaited: an unanswered one keeps the silence going.
                running = sum(1 for t in self.running.values() if (t.id, t.attempt) not in self.lost)
                body = {
                    "worker": self.w.worker_id,
                    "running": running,
                    **report_body(Command.HEARTBEAT, held),
                }
                rid = self.send(Command.HEARTBEAT, body, wait=False)
                self.heartbeats = {rid if rid is not None else -next(self.rids): held}
                self.heartbeat_to = self.current
            else:
                self.heartbeats = {}
            for rid, (_, _, sent, _) in list(self.unacked.items()):
                if now - sent > RESEND_AFTER:
                    self.requeue(rid)

    def pending_reports(self) -> bool:
        return bool(self.unacked) or any(self.outbox.values())

    def collect(self) -> None:
        """Move finished handlers' outcomes to the outbox, with the seconds each run took."""
        now = time.monotonic()
        ran: dict[str, list[float]] = {}  # per queue, the runs' seconds, counted once at the end
        failed: dict[str, int] = {}
        while self.w._done:
            outcome = self.w._done.popleft()
            task = outcome.task
            if outcome.handler_done:
                forget(task)
            if self.running.pop(task.id, None) is None:
                continue  # not ours any more: a second outcome, refused
            elapsed = max(0.0, now - self.started.pop(task.id, now))
            seconds = ran.get(task.queue)
            if seconds is None:
                seconds = ran[task.queue] = []
            seconds.append(elapsed)
            if not outcome.ok:
                failed[task.queue] = failed.get(task.queue, 0) + 1
            if (task.id, task.attempt) in self.lost:
                self.lost.discard((task.id, task.attempt))  # the broker would refuse it
            elif outcome.ok:
                self.outbox[Command.COMPLETE].append((task.id, task.attempt, outcome.result, elapsed))
            else:
                row = (task.id, task.attempt, outcome.error, outcome.retry, elapsed)
                self.outbox[Command.FAIL].append(row)
                log(
                    logger,
                    "warning",
                    "task_failed",
                    task=task.id,
                    queue=task.queue,
                    attempt=task.attempt,
                    retry=outcome.retry and task.failures + 1 < task.max_attempts,
                    error=outcome.error.partition("\n")[0][:500],
                )
        for queue, seconds in ran.items():
            self.metrics.ran(queue, seconds, failed.get(queue, 0))

    def receive(self, link: Link) -> None:
        while True:
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            link.heard(time.monotonic())
            if self.alone_failovers:  # the only broker answers again
                self.alone_failovers = 0
                self.poll_after = 0.0
                self.outage.over()
            try:
                msg = decode(frames, allowed=REPLIES)
                tasks = contexts(parse_deliver(msg)) if msg.command is Command.DELIVER else []
            except ProtocolError as exc:
                if exc.code is not ErrorCode.BAD_VERSION:
                    log(logger, "warning", "bad_reply", error=str(exc))
                    continue
                if link.endpoint not in self.wrong_version:  # a broker of another release: go elsewhere
                    self.wrong_version.add(link.endpoint)
                    log(logger, "error", "bad_version", endpoint=link.endpoint, error=str(exc))
                self.unpinged.discard(link.endpoint)
                give_up(self, link.endpoint)
                return
            if msg.command is Command.PONG:
                self.unpinged.discard(link.endpoint)
            self.on_reply(msg, tasks)
            if link.sock.closed:  # the reply made us fail over
                return
            if msg.command is Command.ERROR and msg.body.get("code") == "shutting_down":
                give_up(self, link.endpoint)  # what it refused goes to another broker now
                return

    def on_reply(self, msg: Message, tasks: list[TaskContext]) -> None:
        """`tasks`: a DELIVER's. Those of a poll given up on (failover) are ours all the same: they
        are run, or given back at once when stopping, rather than left to expire."""
        if msg.command is Command.PONG:
            self.mesh.learn(msg.body)
            return
        if msg.command is Command.DELIVER:
            if msg.rid == self.poll_rid:
                self.poll_rid = None
                self.last_poll_empty = not tasks
            handled = self.routes
            self.prefetched.extend(t for t in tasks if t.queue in handled)  # given back if stopping
            self.outbox[Command.RELEASE].extend((t.id, t.attempt) for t in tasks if t.queue not in handled)
            return
        if msg.rid == self.poll_rid:  # shutting down, or refusing: another broker, or this one anew
            self.poll_rid = None
            log(logger, "warning", "poll_refused", error=str(msg.body.get("message")))
            failover(self)
            return
        if msg.command is Command.ERROR and msg.rid in self.unacked:
            self.requeue(msg.rid)  # refused for now (busy, database down): send it again shortly
            self.hold_until = time.monotonic() + REFUSED_PAUSE
            log(logger, "info", "report_deferred", error=str(msg.body.get("message")))
            return
        sent = self.unacked.pop(msg.rid, None)
        if msg.command is Command.ERROR:
            log(logger, "warning", "request_refused", error=str(msg.body.get("message")))
        elif msg.command is Command.ACK and sent is None:  # a heartbeat's answer
            self.lose(self.heartbeats.pop(msg.rid, []), msg.body.get("outcomes", []))
        elif msg.command is Command.ACK and sent is not None:
            for row, outcome in zip(sent[1], msg.body.get("outcomes", []), strict=False):
                if outcome != "ok":
                    log(
                        logger,
                        "warning",
                        "refused",
                        command=sent[0].value,
                        task=row[0],
                        attempt=row[1],
                        outcome=outcome,
                    )

    def lose(self, rows: list[tuple[int, int]], outcomes: list[Any]) -> None:
        """Tasks a heartbeat was refused for (stale, finished, cancelled, unknown): another delivery
        or nobody holds them now, and every report would be refused too. A prefetched one is not
        run; a running one is no longer heartbeated, and its outcome is dropped."""
        # Only tasks still held: one finished since the heartbeat left (its COMPLETE committed
        # first) is refused as finished, and that is no news.
        held = {(t.id, t.attempt) for t in (*self.running.values(), *self.prefetched)}
        refused = [(row, o) for row, o in zip(rows, outcomes, strict=False) if o != "ok" and row in held]
        if not refused:
            return
        lost = {task for task, _ in refused}
        for (task_id, attempt), outcome in refused:
            log(logger, "warning", "lease_lost", task=task_id, attempt=attempt, outcome=outcome)
        self.prefetched = deque(t for t in self.prefetched if (t.id, t.attempt) not in lost)
        for task in self.running.values():
            if (task.id, task.attempt) in lost:  # tell its handler: an event, or CancelledError
                self.lost.add((task.id, task.attempt))
                self.runner.cancel(task)
                if self.aio:
                    self.aio.cancel(task)
