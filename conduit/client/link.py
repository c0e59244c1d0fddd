"""One DEALER to one broker, and whether that broker is still there (docs/PROTOCOL.md §11).

A broker is alive while a peer hears from it. Silence counts only while the peer waits for
something (a reply, a DELIVER, an ACK): having heard nothing for one interval, the peer sends a
PING, which the broker answers at once from its socket loop, without the database; after two
intervals of silence the broker is gone, paused or cut off. A connection that ZeroMQ reports
dropped means the same at once: a reply comes back only on the connection that carried its
request, so whatever was sent on it is lost. A socket monitor tells drops, refused connection
attempts and completed handshakes, so a peer also knows when there is no broker to send to.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from conduit.wire import MAX_MESSAGE_BYTES, Command, encode

LIVENESS = 1.0  # seconds of silence before a PING; twice this and the broker is gone
RECONNECT_GRACE = 0.3  # a broker seen refusing or dropping connections gets this long to be back
_DOWN = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
_UP = zmq.EVENT_HANDSHAKE_SUCCEEDED


def dealer(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a broker that is not connected
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
    sock.connect(endpoint)
    return sock


class Link:
    """Not thread-safe: one owner. Call `begin` before sending when nothing was awaited from this
    broker, `heard` for every message received on `sock`, and `gone` while something is awaited."""

    _ping_rids = itertools.count(2**62)  # apart from the owners' request ids

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, liveness: float = LIVENESS) -> None:
        self.endpoint = endpoint
        self.liveness = liveness
        self.sock = dealer(ctx, endpoint)
        self._monitor = self.sock.get_monitor_socket(_DOWN | _UP)
        self._heard = time.monotonic()
        self._pinged = -math.inf
        self._drops = 0  # connections dropped so far
        self._drops_seen = 0  # ... of which before the current wait began
        self.down = False  # the last attempt failed or the connection dropped, none made since

    def begin(self, now: float) -> None:
        """Silence counts from now; a connection dropped before now lost nothing we wait for."""
        self._events()
        self._drops_seen = self._drops
        self._heard = now

    def heard(self, now: float) -> None:
        self._heard = now

    def writable(self, timeout: float) -> bool:
        """Wait up to `timeout` for a connection to send on (IMMEDIATE: writable once connected),
        but only a moment when the broker is known to be down: refusing or dropping connections
        (ZeroMQ retries every 0.1 s, so a broker restarting on its endpoint is soon back)."""
        start = time.monotonic()
        while True:
            if self.sock.poll(0, zmq.POLLOUT):
                return True
            self._events()
            now = time.monotonic()
            left = start + (min(timeout, RECONNECT_GRACE) if self.down else timeout) - now
            if left <= 0:
                return False
            self.sock.poll(round(min(left, 0.01) * 1000), zmq.POLLOUT)

    def gone(self, now: float) -> str | None:
        """Why the broker is gone for what we wait on, or None; PINGs it when it has been quiet."""
        self._events()
        if self._drops > self._drops_seen:
            return "its connection dropped"
        if self.sock.poll(0):
            return None  # heard: messages arrived that the owner has yet to read
        silent = now - self._heard
        if silent >= 2 * self.liveness:
            return f"silent for {silent:.1f}s"
        if silent >= self.liveness and now - self._pinged >= self.liveness:
            self._pinged = now
            try:
                self.sock.send_multipart(encode(Command.PING, {"rid": next(self._ping_rids)}), zmq.NOBLOCK)
            except zmq.Again:  # IMMEDIATE: not writable means no connection
                return "no connection for a PING"
        return None

    def _events(self) -> None:
        while True:
            try:
                kind = int(parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))["event"])
            except zmq.Again:
                return
            self._drops += kind == zmq.EVENT_DISCONNECTED
            self.down = bool(kind & _DOWN)

    def close(self) -> None:
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)
