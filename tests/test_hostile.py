"""Hostile input against the broker's core: whatever a peer sends, the core never raises, answers
an error where one can be routed, and a refused message changes nothing.

The core is driven in a busy state (a write in flight, more writes queued, waiting polls, tasks
delivered and buffered), since a message that slips through validation would show there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conduit.broker import core
from conduit.broker.core import Config, Core
from conduit.broker.events import Acquired, Leased, Received
from conduit.store import BrokerLease
from conduit.task import LeasedTask
from conduit.wire import (
    PREVIOUS,
    PROTOCOL,
    REPLIES,
    REQUESTS,
    Command,
    ProtocolError,
    decode,
    encode,
    parse_ids,
    parse_poll,
    parse_submit,
    parse_submit_key,
)

NOW = 1.0
RUN_AT = datetime(2026, 1, 1, tzinfo=UTC)
ROGUE = b"rogue"
FIELDS = [
    *("rid", "queue", "payload", "queues", "worker", "max", "timeout", "ids", "delay", "priority"),
    *("max_attempts", "lease_timeout", "key", "idempotency_key", "backoff_base", "backoff_max"),
    *("id", "attempt", "result", "error", "retry"),
]


def busy_core() -> Core:
    """A core with something in every part of its state."""
    c = Core(Config(broker_id="b1", lease_batch=10, buffer_size=20))
    c.handle(Acquired(BrokerLease("b1", 1), 0.0))

    def task(task_id: int, queue: str) -> LeasedTask:
        return LeasedTask(task_id, queue, 0, RUN_AT, 1, 0, 5, 30.0, b"p")

    def send(peer: bytes, command: Command, **body: Any) -> list[core.Action]:
        return c.handle(Received(peer, encode(command, body), NOW))

    send(b"w1", Command.POLL, rid=1, worker="w1", queues=["q"], max=2, timeout=30)
    c.handle(Leased("q", [task(i, "q") for i in range(1, 11)], None, NOW))  # 2 delivered, 8 buffered
    send(b"w2", Command.POLL, rid=2, worker="w2", queues=["idle"], timeout=30)  # waits; a read in flight
    actions = send(b"c", Command.SUBMIT, rid=3, queue="s", payload=[b"x"])
    assert any(isinstance(a, core.Write) for a in actions)  # now a write is in flight...
    send(b"c", Command.SUBMIT, rid=4, queue="s", payload=[b"y"])  # ...and one queued
    send(b"w1", Command.COMPLETE, rid=5, id=[1], attempt=[1], result=[b"done"])
    return c


def snapshot(c: Core) -> str:
    """Everything the core holds, as text: dataclasses, deques and counters all show their content."""
    return repr(sorted(vars(c).items()))


BASE = busy_core()
BEFORE = snapshot(BASE)


def fresh() -> Core:
    c = busy_core()
    assert snapshot(c) == BEFORE  # the set-up is deterministic, so any change below is the input's
    return c


def accepted_by_the_parsers(frames: list[bytes]) -> bool:
    try:
        msg = decode(frames)
        if msg.command is Command.SUBMIT:
            parse_submit(msg, BASE.config.max_payload_bytes)
            parse_submit_key(msg)
        elif msg.command is Command.POLL:
            parse_poll(msg)
        elif msg.command in (Command.CANCEL, Command.RETRY, Command.RESULT):
            parse_ids(msg)
        elif msg.command not in (Command.PING, Command.WORKERS):
            core._SETTLING[msg.command][1](msg)
    except ProtocolError:
        return False
    return True


def check(frames: list[bytes]) -> None:
    """The core refuses exactly what the parsers refuse, with one ERROR and no change of state."""
    c = fresh()
    actions = c.handle(Received(ROGUE, frames, NOW))
    sends = [a for a in actions if isinstance(a, core.Send)]
    assert all(s.peer == ROGUE for s in sends)
    # a conduit/1 request is refused in conduit/1: read as ours, the body is the same
    replies = [decode([PROTOCOL, *s.frames[1:]], allowed=REPLIES) for s in sends]
    if any(r.command is Command.ERROR for r in replies):
        assert len(replies) == 1
        assert all(isinstance(a, core.Send | core.Log) for a in actions), actions
        assert snapshot(c) == BEFORE
    else:
        assert accepted_by_the_parsers(frames), frames


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4),
    max_leaves=20,
)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), values, max_size=6)
commands = st.sampled_from(sorted(REQUESTS | REPLIES)).map(lambda c: c.value.encode()) | st.binary(max_size=8)
fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_any_frames(frames: list[bytes]) -> None:
    check(frames)


@fuzz
@given(commands, bodies)
def test_any_body_under_a_valid_header(command: bytes, body: dict[Any, Any]) -> None:
    """Mostly wrong types and missing or extra fields."""
    check([PROTOCOL, command, msgpack.packb(body, use_bin_type=True)])


@fuzz
@given(st.sampled_from(sorted(c.value.encode() for c in REQUESTS)), bodies, st.data())
def test_truncated_and_padded_bodies(command: bytes, body: dict[Any, Any], data: st.DataObject) -> None:
    raw = msgpack.packb({**body, "rid": 1}, use_bin_type=True)
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    check([PROTOCOL, command, raw[:cut]])
    check([PROTOCOL, command, raw + data.draw(st.binary(min_size=1, max_size=8))])


@fuzz
@given(st.integers(min_value=1, max_value=100_000), st.sampled_from([b"\x91", b"\x81\xa1k"]))
def test_deep_nesting(depth: int, opener: bytes) -> None:
    check([PROTOCOL, b"POLL", opener * depth + b"\xc0"])


def test_oversized_body_and_batches() -> None:
    check([PROTOCOL, b"SUBMIT", b"\x00" * (16 * 1024 * 1024 + 1)])
    check([PROTOCOL, b"SUBMIT", msgpack.packb({"rid": 1, "queue": "q", "payload": [b"x"] * 10_001})])
    rows = {"id": [1] * 10_001, "attempt": [1] * 10_001}
    check([PROTOCOL, b"COMPLETE", msgpack.packb({"rid": 1, **rows})])
    check([PROTOCOL, b"SUBMIT", msgpack.packb({"rid": 1, "queue": "q", "payload": [b"x" * 2**21]})])


def test_a_bad_row_anywhere_in_a_batch_refuses_the_whole_batch() -> None:
    """A partly valid SUBMIT must not enqueue its valid part: one answer, one outcome."""
    for bad in (
        {"queue": ["s", "s", "no spaces"]},
        {"payload": [b"x", b"x", "str"]},
        {"queue": ["s", "s", None]},
        {"priority": [0, 0, 40_000]},
        {"delay": [0, 0]},  # a column of another length
    ):
        check([PROTOCOL, b"SUBMIT", msgpack.packb({"rid": 9, "queue": "s", "payload": [b"x"] * 3, **bad})])
    for columns in (
        {"id": [2, 3], "attempt": [1, "x"], "result": [b"r", b"r"]},
        {"id": [2, 3], "attempt": [1, 1], "result": [b"r", "str"]},
        {"id": [2, 3], "attempt": [1]},
    ):
        check([PROTOCOL, b"COMPLETE", msgpack.packb({"rid": 9, **columns})])


@fuzz
@given(st.sampled_from(sorted(c.value.encode() for c in REQUESTS)), bodies)
def test_a_conduit_1_peer_is_refused_in_its_own_framing(command: bytes, body: dict[Any, Any]) -> None:
    """Whatever an old peer sends, it gets one bad_version ERROR framed conduit/1, and nothing changes."""
    c = fresh()
    actions = c.handle(Received(ROGUE, [PREVIOUS, command, msgpack.packb(body, use_bin_type=True)], NOW))
    (reply,) = [a for a in actions if isinstance(a, core.Send)]
    assert reply.peer == ROGUE and reply.frames[:2] == [PREVIOUS, b"ERROR"]
    error = msgpack.unpackb(reply.frames[2])
    assert (
        error["code"] == "bad_version" and "conduit/1" in error["message"] and "conduit/2" in error["message"]
    )
    rid = body.get("rid")
    assert error["rid"] == (rid if type(rid) is int and 0 <= rid < 2**64 else None)
    assert snapshot(c) == BEFORE
