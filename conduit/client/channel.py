"""A request/reply channel to one broker over a DEALER socket, matched by request id.

Replies to requests that timed out are told apart by rid and dropped; after a timeout the socket
is rebuilt (the Lazy Pirate pattern), so nothing queued for a dead broker is delivered later.
A broker that goes quiet is given up on after two liveness intervals (conduit.client.link), not
at the request's timeout, so a paused broker costs a caller about 2 s.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import zmq

from conduit.client.link import LIVENESS, Link
from conduit.curve import refused_hint
from conduit.errors import ConduitError
from conduit.wire import REPLIES, Command, ErrorCode, Message, ProtocolError, decode, encode


class BrokerError(ConduitError):
    """The broker refused a request; `code` is the protocol's error code (see docs/PROTOCOL.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class BrokerTimeout(ConduitError):
    """No broker answered in time, or the one asked went quiet."""


class NotConnected(BrokerTimeout):
    """No connection to the broker could be made: the request was never sent."""


class Channel:
    """Not thread-safe: one owner at a time (Client serialises callers with a lock)."""

    _rids = itertools.count(int(time.time() * 1000) % 2**32)

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, liveness: float = LIVENESS) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.liveness = liveness
        self.link = Link(ctx, endpoint, liveness)

    def request(self, command: Command, body: dict[str, Any], timeout: float) -> Message:
        rid = next(self._rids)
        deadline = time.monotonic() + timeout
        connect = min(timeout, 2 * self.liveness)
        self.link.begin(time.monotonic())
        try:
            if not self.link.writable(connect):
                raise zmq.Again
            self.link.sock.send_multipart(encode(command, {**body, "rid": rid}), zmq.NOBLOCK)
        except zmq.Again:
            down = "it refuses connections or dropped ours" if self.link.down else f"none within {connect:g}s"
            down += refused_hint(self.ctx)
            self.reset()
            raise NotConnected(f"no connection to the broker at {self.endpoint}: {down}") from None
        while (left := deadline - (now := time.monotonic())) > 0:
            if why := self.link.gone(now):
                self.reset()
                raise BrokerTimeout(f"broker at {self.endpoint} is gone: {why}")
            if not self.link.sock.poll(round(min(left, 0.1) * 1000)):
                continue
            frames = self.link.sock.recv_multipart()
            self.link.heard(time.monotonic())
            try:
                reply = decode(frames, allowed=REPLIES)
            except ProtocolError as exc:
                if exc.code is ErrorCode.BAD_VERSION:  # a broker of another release refused it
                    raise BrokerError(exc.code.value, f"{exc} (at {self.endpoint})") from None
                continue  # a garbled reply is no answer
            if reply.rid != rid and not (reply.command is Command.ERROR and reply.rid == -1):
                continue  # a PONG, or a late reply to an earlier request (an ERROR without rid is ours)
            if reply.command is Command.ERROR:
                raise BrokerError(str(reply.body.get("code")), str(reply.body.get("message")))
            return reply
        self.reset()
        raise BrokerTimeout(f"broker at {self.endpoint} did not answer within {timeout:g}s")

    def reset(self) -> None:
        self.link.close()
        self.link = Link(self.ctx, self.endpoint, self.liveness)

    def close(self) -> None:
        self.link.close()
