"""One DEALER to one broker, and whether that broker is still there (docs/PROTOCOL.md §11).

A broker is alive while a peer hears from it. Silence counts only while the peer waits for
something (a reply, a DELIVER, an ACK): having heard nothing for one interval, the peer sends a
PING, which the broker answers at once from its socket loop, without the database; after two
intervals of silence the broker is gone, paused or cut off. A connection that ZeroMQ reports
dropped, or a PING that cannot be sent for want of one, means the same at once: a reply comes
back only on the connection that carried its request, so whatever was sent on it is lost.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import zmq

from conduit.wire import MAX_MESSAGE_BYTES, Command, encode

LIVENESS = 1.0  # seconds of silence before a PING; twice this and the broker is gone


def dealer(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a broker that is not connected
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
    sock.connect(endpoint)
    return sock


class Link:
    """Not thread-safe: one owner. Call `begin` before sending when nothing was awaited, `heard`
    for every message received on `sock`, and `gone` while something is awaited."""

    _ping_rids = itertools.count(2**62)  # apart from the owners' request ids

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, liveness: float = LIVENESS) -> None:
        self.endpoint = endpoint
        self.liveness = liveness
        self.sock = dealer(ctx, endpoint)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._heard = time.monotonic()
        self._pinged = -math.inf

    def begin(self, now: float) -> None:
        """Silence counts from now; a connection dropped before now lost nothing we wait for."""
        self._dropped()
        self._heard = now

    def heard(self, now: float) -> None:
        self._heard = now

    def gone(self, now: float) -> str | None:
        """Why the broker is gone for what we wait on, or None; PINGs it when it has been quiet."""
        if self._dropped():
            return "its connection dropped"
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

    def _dropped(self) -> bool:
        dropped = False
        while True:
            try:
                self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            dropped = True

    def close(self) -> None:
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)
