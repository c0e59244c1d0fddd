"""A request/reply channel to one broker over a DEALER socket, matched by request id.

Replies to requests that timed out are told apart by rid and dropped; after a timeout the socket
is rebuilt (the Lazy Pirate pattern), so nothing queued for a dead broker is delivered later.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import zmq

from conduit.errors import ConduitError
from conduit.wire import MAX_MESSAGE_BYTES, REPLIES, Command, Message, ProtocolError, decode, encode


class BrokerError(ConduitError):
    """The broker refused a request; `code` is the protocol's error code (see docs/PROTOCOL.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class BrokerTimeout(ConduitError):
    """No broker answered in time."""


class NotConnected(BrokerTimeout):
    """No connection to the broker could be made: the request was never sent."""


def dealer(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a broker that is not connected
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
    sock.connect(endpoint)
    return sock


class Channel:
    """Not thread-safe: one owner at a time (Client serialises callers with a lock)."""

    _rids = itertools.count(int(time.time() * 1000) % 2**32)

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.sock = dealer(ctx, endpoint)

    def request(self, command: Command, body: dict[str, Any], timeout: float) -> Message:
        rid = next(self._rids)
        deadline = time.monotonic() + timeout
        if not self.sock.poll(round(timeout * 1000), zmq.POLLOUT):  # IMMEDIATE: writable once connected
            self.reset()
            raise NotConnected(f"no connection to the broker at {self.endpoint} within {timeout:g}s")
        self.sock.send_multipart(encode(command, {**body, "rid": rid}), zmq.NOBLOCK)
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(round(left * 1000)):
                break
            try:
                reply = decode(self.sock.recv_multipart(), allowed=REPLIES)
            except ProtocolError:
                continue  # a garbled reply is no answer
            if reply.rid != rid and not (reply.command is Command.ERROR and reply.rid == -1):
                continue  # a late reply to an earlier request (an ERROR without rid is about ours)
            if reply.command is Command.ERROR:
                raise BrokerError(str(reply.body.get("code")), str(reply.body.get("message")))
            return reply
        self.reset()
        raise BrokerTimeout(f"broker at {self.endpoint} did not answer within {timeout:g}s")

    def reset(self) -> None:
        self.sock.close(linger=0)
        self.sock = dealer(self.ctx, self.endpoint)

    def close(self) -> None:
        self.sock.close(linger=0)
