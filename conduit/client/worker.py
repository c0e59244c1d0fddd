"""conduit.client.Worker: long-polls a broker, runs handlers concurrently, heartbeats, reports back.

One thread owns the socket and all bookkeeping; handlers run in a thread or process pool and
hand their outcomes back through a queue and a wake-up pipe. Completions are resent until the
broker acknowledges their commit, so a finished task is not run again for nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from conduit.client.context import Handler, Outcome, TaskContext
from conduit.client.link import LIVENESS, Link
from conduit.client.mesh import Mesh
from conduit.client.runners import ProcessRunner, ThreadRunner
from conduit.client.wakeup import Wakeup
from conduit.logs import log
from conduit.task import check_queue_name
from conduit.wire import MAX_BATCH, REPLIES, Command, Message, ProtocolError, decode, encode

logger = logging.getLogger("conduit.worker")
RESEND_AFTER = 5.0  # seconds without an ACK before a complete or fail is sent again
MAX_UNACKED = 2  # report messages awaiting their commit; later outcomes wait and go together
REFUSED_PAUSE = 0.1  # after a refusal (busy, database down), wait this long before sending again
STOP_GRACE = 30.0  # on stop, how long to keep resending unacknowledged reports before giving up


class Worker:
    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        concurrency: int = 4,
        prefetch: int | None = None,
        pool: str = "thread",
        poll_timeout: float = 5.0,
        heartbeat_interval: float = 2.5,
        worker_id: str | None = None,
        gossip: Sequence[str] = (),
        liveness: float = LIVENESS,
    ) -> None:
        """`heartbeat_interval` keeps task leases alive (a database write); `liveness` is how
        soon a quiet broker is PINGed, and twice it how soon it is left for another."""
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self.gossip = list(gossip)  # gossip endpoints; brokers also advertise theirs
        self.concurrency = concurrency
        self.prefetch = concurrency if prefetch is None else prefetch
        self.pool = pool
        self.poll_timeout = poll_timeout
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.handlers: dict[str, Handler] = {}
        self._stop = threading.Event()
        self._done: deque[Outcome] = deque()  # appended by handler threads, drained by the loop
        self._wakeup = Wakeup()

    def handler(self, queue_name: str) -> Callable[[Handler], Handler]:
        """Decorator: run this function for tasks of `queue_name`; it returns bytes or None."""
        check_queue_name(queue_name)

        def register(fn: Handler) -> Handler:
            self.handlers[queue_name] = fn
            return fn

        return register

    def stop(self) -> None:
        """Finish the tasks in hand, give back the prefetched ones, then return from run()."""
        self._stop.set()
        self._wakeup.set()

    def _finished(self, outcome: Outcome) -> None:
        self._done.append(outcome)
        self._wakeup.set()

    def run(self) -> None:
        if not self.handlers:
            raise ValueError("register at least one handler before run()")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        sys.setswitchinterval(0.0005)  # hand outcomes and deliveries between threads promptly
        runner_type = ProcessRunner if self.pool == "process" else ThreadRunner
        runner = runner_type(self.concurrency, self._finished)
        ctx = zmq.Context()
        try:
            _Loop(self, ctx, runner).run()
        finally:
            runner.shutdown()
            ctx.term()


class _Loop:
    """The worker's bookkeeping, owned by one thread."""

    def __init__(self, worker: Worker, ctx: zmq.Context[Any], runner: ThreadRunner | ProcessRunner) -> None:
        self.w = worker
        self.ctx = ctx
        self.runner = runner
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
        self.lost: set[tuple[int, int]] = set()  # running, but the lease is another's: result dropped
        self.unacked: dict[int, tuple[Command, list[list[Any]], float]] = {}  # rid -> what, rows, sent
        self.outbox: dict[Command, list[list[Any]]] = {
            Command.COMPLETE: [],
            Command.FAIL: [],
            Command.RELEASE: [],
        }
        self.hold_until = 0.0
        self.next_heartbeat = 0.0
        self.heartbeats: dict[int, list[list[int]]] = {}  # the last heartbeat's rid and rows
        self.heartbeat_misses = 0
        for endpoint in worker.endpoints:  # ask each broker where it gossips
            self.send(Command.PING, {}, endpoint, wait=False)

    def link(self, endpoint: str) -> Link:
        if endpoint not in self.links:
            self.links[endpoint] = Link(self.ctx, endpoint, self.w.liveness)
            self.poller.register(self.links[endpoint].sock, zmq.POLLIN)
        return self.links[endpoint]

    def send(
        self, command: Command, body: dict[str, Any], endpoint: str | None = None, wait: bool = True
    ) -> int | None:
        """Send (to the current broker by default), waiting up to 1 s for a connection if `wait`;
        None if there is none (the caller tries again)."""
        link = self.link(endpoint or self.current)
        if link.endpoint == self.current and not self.waiting():
            link.begin(time.monotonic())
        sock = link.sock
        rid = next(self.rids)
        frames = encode(command, {**body, "rid": rid})
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            if not wait or not sock.poll(1000, zmq.POLLOUT):
                return None
            sock.send_multipart(frames, zmq.NOBLOCK)
        return rid

    def flush(self) -> None:
        """Send outcomes that must be acknowledged after their commit; resent until they are. With a
        few reports unacknowledged, new outcomes wait and then go together (batching under load)."""
        now = time.monotonic()
        for command, rows in self.outbox.items():
            while rows and len(self.unacked) < MAX_UNACKED and now >= self.hold_until:
                batch, self.outbox[command] = rows[:MAX_BATCH], rows[MAX_BATCH:]
                rows = self.outbox[command]
                rid = self.send(command, {"tasks": batch})
                self.unacked[rid if rid is not None else -next(self.rids)] = (command, batch, now)

    def requeue(self, rid: int) -> None:
        command, rows, _ = self.unacked.pop(rid)
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
            now = time.monotonic()
            if self.waiting() and (why := self.link(self.current).gone(now)):
                log(logger, "warning", "broker_gone", endpoint=self.current, why=why)
                self.failover()
            elif self.poll_rid is not None and now > self.poll_deadline:
                self.failover()

    def step_out(self) -> None:
        """Start what can run, give back what will not, ask for more, heartbeat."""
        now = time.monotonic()
        while self.prefetched and len(self.running) < self.w.concurrency and not self.w._stop.is_set():
            task = self.prefetched.popleft()
            self.running[task.id] = task
            self.runner.submit(self.w.handlers[task.queue], task)
        if self.w._stop.is_set() and self.prefetched:
            self.outbox[Command.RELEASE].extend([t.id, t.attempt] for t in self.prefetched)
            self.prefetched.clear()
        room = self.w.concurrency + self.w.prefetch - len(self.running) - len(self.prefetched)
        if self.poll_rid is None and room > 0 and not self.w._stop.is_set():
            self.choose_broker()
            body = {"worker": self.w.worker_id, "queues": list(self.w.handlers), "max": room}
            self.poll_rid = self.send(Command.POLL, {**body, "timeout": self.w.poll_timeout})
            self.poll_deadline = now + self.w.poll_timeout + 5
            if self.poll_rid is None:  # no connection: try the next broker
                self.failover()
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.w.heartbeat_interval
            held = [
                [t.id, t.attempt]
                for t in (*self.running.values(), *self.prefetched)
                if (t.id, t.attempt) not in self.lost
            ]
            # An unanswered heartbeat is a broker gone or cut off: after two, keep the task leases
            # alive through another broker before they expire (heartbeats are our liveness probe).
            self.heartbeat_misses = self.heartbeat_misses + 1 if self.heartbeats else 0
            if self.heartbeat_misses >= 2:
                self.heartbeat_misses = 0
                self.failover()
            self.heartbeats = {}
            if held:  # one that cannot even be sent (no connection) counts as unanswered
                rid = self.send(Command.HEARTBEAT, {"worker": self.w.worker_id, "tasks": held}, wait=False)
                self.heartbeats = {rid if rid is not None else -next(self.rids): held}
            for rid, (_, _, sent) in list(self.unacked.items()):
                if now - sent > RESEND_AFTER:
                    self.requeue(rid)

    def waiting(self) -> bool:
        """Something sent to the current broker awaits its answer: its silence counts."""
        return self.poll_rid is not None or bool(self.unacked) or bool(self.heartbeats)

    def pending_reports(self) -> bool:
        return bool(self.unacked) or any(self.outbox.values())

    def collect(self) -> None:
        """Move finished handlers' outcomes to the outbox."""
        while self.w._done:
            outcome = self.w._done.popleft()
            task = outcome.task
            self.running.pop(task.id, None)
            if (task.id, task.attempt) in self.lost:
                self.lost.discard((task.id, task.attempt))  # the broker would refuse it
            elif outcome.ok:
                self.outbox[Command.COMPLETE].append([task.id, task.attempt, outcome.result])
            else:
                self.outbox[Command.FAIL].append([task.id, task.attempt, outcome.error, outcome.retry])

    def choose_broker(self) -> None:
        """Deepest first: while polls bring tasks, stay (a busy worker talks to one broker); after
        an empty poll, go where gossip shows the most buffered for our queues, or, with nothing
        buffered anywhere, to the broker with the fewest waiting polls, so idle workers spread."""
        if not self.last_poll_empty:
            return
        self.mesh.update()
        ranked = self.mesh.rank(list(self.w.handlers), avoid=self.current)
        if not self.mesh.live():  # no gossip yet: go round the configured list
            i = ranked.index(self.current) if self.current in ranked else -1
            ranked = ranked[i + 1 :] + ranked[: i + 1]
        self.current = ranked[0]

    def receive(self, link: Link) -> None:
        while True:
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            link.heard(time.monotonic())
            try:
                msg = decode(frames, allowed=REPLIES)
            except ProtocolError as exc:
                log(logger, "warning", "bad_reply", error=str(exc))
                continue
            self.on_reply(msg)
            if msg.command is Command.ERROR and msg.body.get("code") == "shutting_down":
                if link.endpoint == self.current:  # what it refused goes to another broker now
                    self.failover()
                return  # its socket may be closed now

    def on_reply(self, msg: Message) -> None:
        if msg.command is Command.PONG:
            self.mesh.subscribe(str(msg.body.get("pub") or ""))
            return
        if msg.command is Command.DELIVER and msg.rid != self.poll_rid:
            # The answer to a poll given up on (failover): its tasks are ours all the same. Run
            # them, or give them back at once when stopping, rather than leave them to expire.
            self.prefetched.extend(TaskContext.from_wire(t) for t in msg.body["tasks"])
            return
        if msg.rid == self.poll_rid:
            self.poll_rid = None
            if msg.command is Command.DELIVER:
                tasks = [TaskContext.from_wire(t) for t in msg.body["tasks"]]
                self.last_poll_empty = not tasks
                if self.w._stop.is_set():
                    self.prefetched.extend(tasks)  # given back by the next step_out
                else:
                    self.prefetched.extend(t for t in tasks if t.queue in self.w.handlers)
            else:  # shutting down, or refusing: another broker, or this one anew, after a pause
                log(logger, "warning", "poll_refused", error=str(msg.body.get("message")))
                self.failover()
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

    def lose(self, rows: list[list[int]], outcomes: list[Any]) -> None:
        """Tasks a heartbeat was refused for (stale, finished, cancelled, unknown): another delivery
        or nobody holds them now, and every report would be refused too. A prefetched one is not
        run; a running one is no longer heartbeated, and its outcome is dropped."""
        # Only tasks still held: one finished since the heartbeat left (its COMPLETE committed
        # first) is refused as finished, and that is no news.
        held = {(t.id, t.attempt) for t in (*self.running.values(), *self.prefetched)}
        refused = [
            (task, o)
            for row, o in zip(rows, outcomes, strict=False)
            if o != "ok" and (task := tuple(row)) in held
        ]
        if not refused:
            return
        lost = {task for task, _ in refused}
        for (task_id, attempt), outcome in refused:
            log(logger, "warning", "lease_lost", task=task_id, attempt=attempt, outcome=outcome)
        self.prefetched = deque(t for t in self.prefetched if (t.id, t.attempt) not in lost)
        self.lost |= {(t.id, t.attempt) for t in self.running.values()} & lost

    def failover(self) -> None:
        """The broker is gone, cut off or refusing: drop its socket (nothing queued for it is sent
        later), move to the next broker, and send everything unacknowledged again there (reports
        are fenced, so a repeat is harmless; task leases are renewed through any broker)."""
        log(logger, "warning", "failover", endpoint=self.current)
        link = self.links.pop(self.current, None)
        if link is not None:
            self.poller.unregister(link.sock)
            link.close()
        self.poll_rid = None
        self.heartbeats = {}  # its answer would come on the socket just closed
        self.next_heartbeat = 0.0  # keep the task leases alive through the next broker at once
        self.mesh.brokers = {b: v for b, v in self.mesh.brokers.items() if v.endpoint != self.current}
        self.last_poll_empty = True
        self.choose_broker()  # away from this broker, at once: reports and heartbeats follow
        self.last_poll_empty = False
        time.sleep(0.1 if len(self.mesh.rank([])) > 1 else 0.5)
        for rid in list(self.unacked):
            self.requeue(rid)
