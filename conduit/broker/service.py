"""The broker process: a thin shell that moves frames and rows between the core and the world.

The main thread owns the ROUTER socket and the core. Threads own one database connection each:
two writers (group commits: one for submits, one for reports and the broker's own bookkeeping),
the reader (leases and lookups), the keeper (broker lease, reaping, counters, paused queues) and
ops (operations), so a slow read never holds up a commit or a lease renewal, and a submit never
waits behind the commit of completions.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import psycopg
import zmq

from conduit.broker import core, operations
from conduit.broker.core import Config, Core
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
from conduit.broker.gate import Gate
from conduit.broker.metrics import DEPTHS_EVERY, SNAPSHOT_EVERY, BrokerMetrics
from conduit.broker.writes import LANES, WriteBatch, execute
from conduit.curve import ServerCurve
from conduit.endpoints import check_advertise
from conduit.errors import BrokerLeaseLost, ConduitError, ConfigError
from conduit.logs import Outage, log
from conduit.store import BrokerLease, Store
from conduit.store.ops import BadCursor
from conduit.wire import MAX_MESSAGE_BYTES, ErrorCode, encode, error_frames

logger = logging.getLogger("conduit.broker")
TICK = 0.05

Job = Callable[[Store], Event | None]


class _DatabaseThread(threading.Thread):
    """Runs jobs against its own connection, reconnecting after a failure; posts events back."""

    def __init__(
        self,
        name: str,
        open_store: Callable[[], Store],
        post: Callable[[Event], None],
        outage: Outage,
        metrics: BrokerMetrics,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._open_store = open_store
        self._post = post
        self._outage = outage
        self._metrics = metrics
        self._jobs: queue.Queue[tuple[Job, Callable[[str], Event | None], bool] | None] = queue.Queue()
        self._store: Store | None = None

    def submit(self, job: Job, on_error: Callable[[str], Event | None], *, read_only: bool = False) -> None:
        """`read_only`: the job is safe to repeat, so one that finds its connection dead (the
        database restarted, or dropped it) runs again at once on a new one instead of failing."""
        self._jobs.put((job, on_error, read_only))

    def stop(self) -> None:
        self._jobs.put(None)

    def run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, on_error, read_only = item
            for retry in (read_only, False):
                reused = self._store is not None
                try:
                    if self._store is None:
                        self._store = self._open_store()
                    event = job(self._store)
                    self._outage.over()  # the database answered: an outage, if any, is over
                except (ConduitError, psycopg.Error) as exc:
                    self._metrics.database_error()
                    broken = self._store is not None and self._store.conn.broken
                    if broken:
                        self._store.close()  # type: ignore[union-attr]
                        self._store = None
                    if retry and broken and reused:
                        continue  # a write is never repeated: it may have committed
                    event = on_error(f"{type(exc).__name__}: {exc}".splitlines()[0])
                except Exception as exc:  # a fault of ours, not the database's: answer it, keep serving
                    logger.exception("job_failed thread=%s", self.name)
                    event = on_error(f"internal: {type(exc).__name__}")
                break
            if event is not None:
                self._post(event)
        if self._store is not None:
            self._store.close()


class _Listener(threading.Thread):
    """LISTENs for other brokers' wake-ups and posts them; reconnects after a failure."""

    def __init__(
        self,
        open_store: Callable[[], Store],
        post: Callable[[Event], None],
        outage: Outage,
        metrics: BrokerMetrics,
    ) -> None:
        super().__init__(name="listener", daemon=True)
        self._open_store = open_store
        self._post = post
        self._outage = outage
        self._metrics = metrics
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                with self._open_store() as store:
                    store.listen()
                    self._outage.over()
                    while not self._halt.is_set():
                        for note in store.conn.notifies(timeout=0.5):
                            self._post(Notified(note.payload, time.monotonic()))
            except (ConduitError, psycopg.Error) as exc:
                self._metrics.database_error()
                self._outage.failed("listen_failed", "warning", error=str(exc).splitlines()[0])
                self._halt.wait(1.0)


class Broker:
    def __init__(
        self,
        config: Config,
        dsn: str,
        schema: str,
        bind: str,
        pub: str | None = None,
        *,
        advertise: str | None = None,
        advertise_pub: str | None = None,
        ensure_database: Callable[[], None] | None = None,
        curve: ServerCurve | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        """`ensure_database` runs before every new connection: the embedded server's restart if it
        vanished, so the broker resumes on its own instead of retrying until someone starts it.
        `advertise`, `advertise_pub`: the endpoints peers reach the binds by (required for a
        wildcard bind, `conduit.endpoints.check_advertise`); recorded in the database and gossiped.
        `curve`: the ROUTER and the PUB are CURVE servers, and a ZAP thread checks every peer's
        key against the allow-list (conduit.broker.gate); None leaves the mesh open.
        `metrics`: what /metrics shows, kept up to date while it is given (MetricsServer serves it)."""
        self.config = config
        self._serving = metrics is not None
        self.metrics = metrics or BrokerMetrics()
        # Every database thread and the listener retry while the database is down: one line an outage.
        self._outage = Outage(logger, "database")

        def open_store() -> Store:
            if ensure_database is not None:
                ensure_database()
            return Store.open(dsn, schema=schema, max_payload_bytes=config.max_payload_bytes)

        self._open_store = open_store
        check_advertise(bind, advertise)
        if pub:
            check_advertise(pub, advertise_pub, "--advertise-pub")
        elif advertise_pub:
            raise ConfigError("--advertise-pub names a gossip endpoint: give --pub too")
        self._ctx = zmq.Context()
        self.curve = curve
        self._gate = Gate(self._ctx, curve.allow) if curve else None  # bound before any socket
        self.router = self._ctx.socket(zmq.ROUTER)
        if curve:
            curve.serve(self.router)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
        self.router.setsockopt(zmq.SNDHWM, 100_000)
        self.router.setsockopt(zmq.RCVHWM, 100_000)
        self.router.bind(bind)
        self.endpoint = advertise or self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.publisher: zmq.Socket[Any] | None = None
        if pub:
            self.publisher = self._ctx.socket(zmq.PUB)
            self.publisher.setsockopt(zmq.LINGER, 0)
            if curve:
                curve.serve(self.publisher)
            self.publisher.bind(pub)
            pub = advertise_pub or self.publisher.getsockopt_string(zmq.LAST_ENDPOINT)
        self.config = config = replace(config, endpoint=self.endpoint, pub_endpoint=pub or "")
        self.core = Core(config)
        self.core.tally.clock_offset = time.time() - time.monotonic()
        self._events: queue.Queue[Event] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._threads = {
            name: _DatabaseThread(name, self._open_store, self._post, self._outage, self.metrics)
            for name in (*LANES, "reader", "keeper", "ops")
        }
        self._listener = _Listener(self._open_store, self._post, self._outage, self.metrics)
        self._next_depths = 0.0  # when the keeper next reads queue_stats() for /metrics
        with self._open_store() as store:  # fail fast, with a clear error, if the database is not there
            store.ensure_partitions()  # after days with no broker up, today's may not exist yet
            self.owner: BrokerLease = self._acquire(store)
            self._post(PeersRead(tuple(store.broker_peers(config.broker_id))))
            self._paused = frozenset(store.paused())  # known before anything is delivered

    def _post(self, event: Event) -> None:
        self._events.put(event)
        with contextlib.suppress(BlockingIOError):  # the pipe is full of wake-ups already
            os.write(self._wake_w, b"!")

    def request_stop(self, *_: Any) -> None:
        self._post(Shutdown(time.monotonic()))

    def run(self) -> None:
        # Hand the GIL over sooner than the default 5 ms, so a database thread whose result is
        # ready is not kept waiting behind the socket loop (latency of every commit and lease).
        sys.setswitchinterval(0.0005)
        # Tasks pass through in many small acyclic objects; the default collector thresholds
        # spent ~9% of the socket loop (py-spy) re-scanning buffered tasks.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        for thread in self._threads.values():
            thread.start()
        self._listener.start()
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        log(
            logger,
            "info",
            "started",
            broker=self.config.broker_id,
            endpoint=self.endpoint,
            epoch=self.owner.epoch,
            curve="on" if self.curve else "off",
        )
        if self.curve is None:
            log(logger, "warning", "security_off", hint="no CURVE: anyone who reaches the ports may use them")
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._apply(self.core.handle(PausedRead(self._paused, time.monotonic())))
        self._apply(self.core.handle(Acquired(self.owner, time.monotonic())))
        next_tick = next_snapshot = 0.0
        try:
            while not self.core.finished(time.monotonic()):
                ready = dict(poller.poll(max(0, round((next_tick - time.monotonic()) * 1000))))
                if self.router in ready:
                    self._receive()
                if self._wake_r in ready:
                    os.read(self._wake_r, 65536)
                self._drain_events()
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    self._apply(self.core.handle(Tick(now)))
                if self._serving and now >= next_snapshot:
                    next_snapshot = now + SNAPSHOT_EVERY
                    live = self.core.owner is not None and now < self.core.lease_valid_until
                    self.metrics.snapshot(self.core.tally, self.core.depths(), live)
        finally:
            for thread in self._threads.values():
                thread.stop()
            for thread in self._threads.values():
                thread.join(timeout=10)
            self._listener.stop()
            self._listener.join(timeout=5)
            self.router.close(linger=0)
            if self.publisher is not None:
                self.publisher.close(linger=0)
            if self._gate is not None:
                self._gate.stop()
            self._ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)
            log(logger, "info", "stopped", broker=self.config.broker_id)

    def _receive(self) -> None:
        for _ in range(10_000):  # then let timers and database results in
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._apply(self.core.handle(Received(frames[0], frames[1:], time.monotonic())))

    def _drain_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, Acquired):
                self.owner = event.owner
                log(logger, "info", "lease_acquired", broker=self.config.broker_id, epoch=event.owner.epoch)
            self._apply(self.core.handle(event))

    def _apply(self, actions: list[core.Action]) -> None:
        todo = deque(actions)
        while todo:
            action = todo.popleft()
            match action:
                case core.Send(peer, frames, delivered):
                    try:
                        self.router.send_multipart([peer, *frames], zmq.NOBLOCK)
                    except zmq.ZMQError:  # gone (ROUTER_MANDATORY) or not reading: never block on a peer
                        todo.extend(self.core.handle(SendFailed(peer, delivered)))
                case core.Write(batch, lane):
                    self._threads[lane].submit(partial(self._write, batch), partial(_write_failed, batch))
                case core.Lease(name, limit, span):
                    self._threads["reader"].submit(
                        partial(self._lease, name, limit, span), partial(_lease_failed, name, span)
                    )
                case core.Lookup(peer, rid, ids):
                    self._threads["reader"].submit(
                        partial(_lookup, peer, rid, ids), partial(_lookup_failed, peer, rid), read_only=True
                    )
                case core.Operate(peer, rid, operation):
                    self._threads["ops"].submit(
                        partial(_operate, peer, rid, operation),
                        partial(_operate_failed, peer, rid),
                        read_only=operation.command not in operations.WRITES,
                    )
                case core.RenewLease(started):
                    self._threads["keeper"].submit(
                        partial(self._renew, started), partial(_renew_failed, started)
                    )
                case core.Reacquire():
                    self._threads["keeper"].submit(self._reacquire, self._retry_reacquire)
                case core.ReadPaused():
                    self._threads["keeper"].submit(_read_paused, self._read_paused_failed, read_only=True)
                case core.SetPaused(peer, rid, queue, paused):
                    # On the keeper, after any read of the set in flight: what it answers is newer.
                    self._threads["keeper"].submit(
                        partial(_set_paused, peer, rid, queue, paused), partial(_set_paused_failed, peer, rid)
                    )
                case core.Reap(compact, prune):
                    self._threads["keeper"].submit(
                        partial(self._reap, compact, prune), self._log_error("reap")
                    )
                case core.Publish(frames):
                    if self.publisher is not None:
                        with contextlib.suppress(zmq.Again):  # gossip is periodic: a drop is harmless
                            self.publisher.send_multipart(frames, zmq.NOBLOCK)
                case core.Log(level, event, fields):
                    # Merged, not passed twice: a field named like ours must not kill the broker.
                    log(logger, level, event, **{"broker": self.config.broker_id, **fields})
                case core.Stop(owner):
                    if owner is not None:
                        self._threads["keeper"].submit(partial(_drop, owner), self._log_error("drop"))

    def _write(self, batch: WriteBatch, store: Store) -> Event:
        return Written(batch, execute(store, batch, self.owner), None, time.monotonic())

    def _lease(self, name: str, limit: int, span: tuple[int, int] | None, store: Store) -> Event:
        if span is None:
            return Leased(name, store.lease(self.owner, name, limit), None, time.monotonic())
        tasks = store.read_back(self.owner, name, span, limit)
        return Leased(name, tasks, None, time.monotonic(), span)

    def _renew(self, started: float, store: Store) -> Event:
        try:
            store.renew_broker(self.owner, self.config.lease_term)
        except BrokerLeaseLost:
            return LeaseRenewed(False, started, time.monotonic())
        # Brokers come and go: read them next, as a job of its own, so that a failed read of them
        # is only that (it leaves the lease renewed, and the peers as last read).
        self._threads["keeper"].submit(self._read_peers, _ignore, read_only=True)
        return LeaseRenewed(True, started, time.monotonic())

    def _read_peers(self, store: Store) -> Event:
        return PeersRead(tuple(store.broker_peers(self.config.broker_id)))

    def _acquire(self, store: Store) -> BrokerLease:
        pub = self.config.pub_endpoint or None
        return store.acquire_broker(self.config.broker_id, self.endpoint, self.config.lease_term, pub)

    def _reacquire(self, store: Store) -> Event:
        return Acquired(self._acquire(store), time.monotonic())

    def _log_error(self, what: str) -> Callable[[str], None]:
        return lambda error: self._outage.failed(f"{what}_failed", error=error)

    def _read_paused_failed(self, error: str) -> Event:
        self._outage.failed("paused_read_failed", error=error)
        return PausedRead(None, time.monotonic())  # the core keeps the set it knew

    def _retry_reacquire(self, error: str) -> Event | None:
        self._outage.failed("reacquire_failed", error=error)
        time.sleep(1)
        self._threads["keeper"].submit(self._reacquire, self._retry_reacquire)
        return None

    def _reap(self, compact: bool, prune: bool, store: Store) -> Event | None:
        reaped = store.reap()
        if reaped.buffered or reaped.running:
            log(logger, "info", "reaped", buffered=reaped.buffered, running=reaped.running)
        store.truncate_buckets()
        if compact:
            store.compact_counts()
        if prune:  # brokers share the work: whoever comes first does it, the others find it done
            made = store.ensure_partitions()
            dropped = store.prune()
            if made or dropped:
                log(logger, "info", "history_pruned", partitions_made=made, partitions_dropped=dropped)
        if self._serving and time.monotonic() >= self._next_depths:
            self._next_depths = time.monotonic() + DEPTHS_EVERY
            self.metrics.queue_depths = store.queue_stats()
        ended = store.take_ended()  # what the reaper failed: the core counts it (STATS, metrics)
        return Tallied(ended) if ended else None


def _write_failed(batch: WriteBatch, error: str) -> Event:
    return Written(batch, None, error, time.monotonic())


def _lease_failed(name: str, span: tuple[int, int] | None, error: str) -> Event:
    return Leased(name, [], error, time.monotonic(), span)


def _lookup(peer: bytes, rid: int, ids: list[int], store: Store) -> Event:
    return LookedUp(peer, rid, store.lookup(ids), None)


def _lookup_failed(peer: bytes, rid: int, error: str) -> Event:
    return LookedUp(peer, rid, [], error)


def _operate(peer: bytes, rid: int, operation: operations.Operation, store: Store) -> Event:
    try:
        reply, body = operations.run(operation, store)
    except BadCursor as exc:
        return Operated(peer, error_frames(ErrorCode.BAD_REQUEST, str(exc), rid))
    return Operated(peer, encode(reply, {"rid": rid, **body}))


def _operate_failed(peer: bytes, rid: int, error: str) -> Event:
    return Operated(peer, error_frames(ErrorCode.UNAVAILABLE, f"database: {error}", rid))


def _read_paused(store: Store) -> Event:
    return PausedRead(frozenset(store.paused()), time.monotonic())


def _set_paused(peer: bytes, rid: int, queue: str, paused: bool, store: Store) -> Event:
    changed = store.pause(queue) if paused else store.resume(queue)
    return PauseSet(peer, rid, changed, frozenset(store.paused()), None, time.monotonic())


def _set_paused_failed(peer: bytes, rid: int, error: str) -> Event:
    return PauseSet(peer, rid, False, None, error, time.monotonic())


def _ignore(error: str) -> None:
    return None


def _renew_failed(started: float, error: str) -> Event:
    return LeaseRenewed(False, started, time.monotonic())


def _drop(owner: BrokerLease, store: Store) -> None:
    store.drop_broker(owner)
