"""The wire protocol as pure functions: framing, encoding, and every way a hostile peer can break it.

No sockets and no database. Each rejection must be a ProtocolError carrying the right ErrorCode and,
once the body could be read, the request's rid: the broker turns exactly that into an ERROR reply.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conduit.broker.operations import OPERATIONS, Operation, parse_operation
from conduit.task import QUEUE_NAME, STATES, Ack, Completion, Failure, TaskInfo, TaskSpec, check_queue_name
from conduit.wire import (
    DELIVER_COLUMNS,
    MAX_BATCH,
    MAX_ERROR_CHARS,
    MAX_HOST_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_NAME_CHARS,
    MAX_POLL_TIMEOUT,
    MAX_QUEUES,
    PREVIOUS,
    PROTOCOL,
    REQUESTS,
    Command,
    Delivery,
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
    parse_deliver,
    parse_fail,
    parse_ids,
    parse_poll,
    parse_queue,
    parse_submit,
    parse_submit_key,
    report_body,
    results_body,
    submit_body,
)

RID = 4242
PAYLOAD_LIMIT = 1024
REPLIES = frozenset(set(Command) - REQUESTS - {Command.GOSSIP})
UINT63_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1


def request(command: Command, **body: Any) -> Message:
    """A request as the broker sees it: encoded, then decoded."""
    return decode(encode(command, {"rid": RID, **body}))


def rejects(call: Callable[[], object], code: ErrorCode, rid: int | None = RID) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        call()
    assert caught.value.code is code, f"{caught.value.code} ({caught.value}) instead of {code}"
    assert caught.value.rid == rid
    return caught.value


def raw_message(body: bytes, command: bytes = b"PING") -> list[bytes]:
    return [PROTOCOL, command, body]


# -- round trips -------------------------------------------------------------------------------

REQUEST_BODIES: dict[Command, dict[str, Any]] = {
    Command.SUBMIT: {"queue": "emails", "payload": [b"\x00\xff"], "priority": [-3], "idempotency_key": "k"},
    Command.POLL: {"worker": "w-1", "queues": ["a", "b"], "max": 10, "timeout": 2.5},
    Command.HEARTBEAT: {"id": [1, 2], "attempt": [1, 3]},
    Command.COMPLETE: {"id": [1, 2], "attempt": [1, 1], "result": [b"result", None]},
    Command.FAIL: {"id": [1], "attempt": [1], "error": ["boom"], "retry": True},
    Command.RELEASE: {"id": [7], "attempt": [2]},
    Command.CANCEL: {"ids": [1, 2, 3]},
    Command.RETRY: {"ids": [4]},
    Command.RESULT: {"ids": [UINT63_MAX]},
    Command.WORKERS: {},
    Command.QUEUES: {},
    Command.LIST: {"queue": "q", "state": "dead", "limit": 10, "after": "abc", "older_than": 1.5},
    Command.SHOW: {"ids": [1, 2]},
    Command.REDRIVE: {"queue": "q"},
    Command.PURGE: {"queue": "q"},
    Command.STATS: {},
    Command.PAUSE: {"queue": "emails"},
    Command.RESUME: {"queue": "emails"},
    Command.PING: {},
}

# decode does not look inside reply bodies; these only need to be plausible.
REPLY_BODIES: dict[Command, dict[str, Any]] = {
    Command.SUBMITTED: {"ids": [1, 2], "created": [True, False]},
    Command.DELIVER: {"broker": "b-1", "id": [1], "attempt": [1], "queue": ["q"], "payload": [b"p"]},
    Command.ACK: {"outcomes": ["ok", "stale"]},
    Command.RESULTS: {"id": [1], "state": ["completed"], "attempt": [1], "result": [b"r"], "error": [None]},
    Command.WORKER_LIST: {"broker": "b-1", "worker": ["w-1"], "peer": ["00ab"], "queues": [["q"]]},
    Command.QUEUE_LIST: {"queue": ["q"], "state": ["dead"], "count": [3]},
    Command.TASK_LIST: {"id": [1], "queue": ["q"], "state": ["dead"], "since": [1.5], "next": None},
    Command.TASK_DETAILS: {"id": [1], "queue": ["q"], "state": ["dead"], "run_at": [None]},
    Command.DONE: {"count": 3},
    Command.BROKER_STATS: {"broker": "b-1", "epoch": 3, "lease_valid": True, "queue": ["q"]},
    Command.PONG: {"broker": "b-1"},
    Command.ERROR: {"code": "busy", "message": "retry"},
}


def test_every_command_is_a_request_or_a_reply() -> None:
    assert set(REQUEST_BODIES) == REQUESTS
    assert set(REPLY_BODIES) == REPLIES
    assert not REQUESTS & REPLIES
    assert set(Command) == REQUESTS | REPLIES | {Command.GOSSIP}  # gossip is broadcast, not a reply


def test_gossip_needs_no_rid_but_other_replies_do() -> None:
    msg = decode(
        encode(Command.GOSSIP, {"broker": "b1", "queues": {"q": [3, 1]}}), allowed=frozenset({Command.GOSSIP})
    )
    assert msg.rid == -1 and msg.body["queues"] == {"q": [3, 1]}


@pytest.mark.parametrize("command", sorted(REQUESTS))
@pytest.mark.parametrize("rid", [0, 1, RID, UINT64_MAX])
def test_request_round_trip(command: Command, rid: int) -> None:
    body = {"rid": rid, **REQUEST_BODIES[command]}
    frames = encode(command, body)
    assert frames[0] == PROTOCOL == b"conduit/2"
    assert frames[1] == command.value.encode()
    assert len(frames) == 3
    msg = decode(frames)
    assert msg == Message(command, body)
    assert msg.command is command
    assert msg.rid == rid


@pytest.mark.parametrize("command", sorted(REPLIES))
def test_reply_round_trip(command: Command) -> None:
    body = {"rid": 9, **REPLY_BODIES[command]}
    msg = decode(encode(command, body), allowed=REPLIES)
    assert msg == Message(command, body)
    assert msg.rid == 9


@pytest.mark.parametrize("command", sorted(REQUESTS))
def test_request_is_unknown_where_only_replies_are_allowed(command: Command) -> None:
    frames = encode(command, {"rid": 5, **REQUEST_BODIES[command]})
    rejects(lambda: decode(frames, allowed=REPLIES), ErrorCode.UNKNOWN_COMMAND, rid=5)


def test_bytes_and_str_stay_distinct_through_a_round_trip() -> None:
    body = {"rid": 1, "s": "text", "b": b"text", "nested": {"x": [b"\x00", "\x00", None, 1.5, -1]}}
    assert decode(encode(Command.PING, body)).body == body


# -- decode: framing, version, body, rid, command ---------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2, 4, 5])
def test_wrong_frame_count_is_bad_frames(count: int) -> None:
    valid = encode(Command.PING, {"rid": 1})
    frames = [*valid, b"extra", b"more"][:count]
    error = rejects(lambda: decode(frames), ErrorCode.BAD_FRAMES, rid=None)
    assert str(count) in str(error)


@pytest.mark.parametrize(
    "protocol", [b"conduit/3", b"conduit/20", b"conduit/", b"CONDUIT/2", b"MDPC01", b"", b"\xff" * 100]
)
def test_wrong_protocol_frame_is_bad_version(protocol: bytes) -> None:
    frames = [protocol, b"PING", msgpack.packb({"rid": 1})]
    error = rejects(lambda: decode(frames), ErrorCode.BAD_VERSION, rid=None)
    assert str(error).startswith("this broker speaks conduit/2; the request was ")
    assert error.protocol == PROTOCOL  # an unknown version is answered in ours


@pytest.mark.parametrize(
    ("raw", "rid"), [({"rid": 12, "tasks": []}, 12), ({"rid": -1}, None), (b"\xc1", None)]
)
def test_a_conduit_1_request_is_refused_in_conduit_1_with_its_rid(raw: Any, rid: int | None) -> None:
    """So that an old peer reads the refusal as its request's answer, and sees both versions."""
    body = raw if isinstance(raw, bytes) else msgpack.packb(raw)
    error = rejects(lambda: decode([PREVIOUS, b"SUBMIT", body]), ErrorCode.BAD_VERSION, rid=rid)
    assert str(error) == "this broker speaks conduit/2; the request was conduit/1"
    frames = error_frames(error.code, str(error), error.rid, error.protocol)
    assert frames[:2] == [b"conduit/1", b"ERROR"]
    assert msgpack.unpackb(frames[2]) == {"rid": rid, "code": "bad_version", "message": str(error)}


@pytest.mark.parametrize("command", [b"ERROR", b"DELIVER", b"GOSSIP"])
def test_a_reply_from_an_older_broker_is_bad_version_naming_both(command: bytes) -> None:
    """What a conduit/2 peer makes of a conduit/1 broker's answer: a clear refusal, not noise."""
    frames = [PREVIOUS, command, msgpack.packb({"rid": None, "code": "bad_version", "message": "..."})]
    allowed = frozenset({Command.GOSSIP}) if command == b"GOSSIP" else REPLIES
    error = rejects(lambda: decode(frames, allowed=allowed), ErrorCode.BAD_VERSION, rid=None)
    assert str(error) == "the broker speaks conduit/1; this peer speaks conduit/2"


def test_version_is_checked_before_the_body() -> None:
    rejects(lambda: decode([b"MDPC01", b"READY", b"\xc1garbage"]), ErrorCode.BAD_VERSION, rid=None)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"not msgpack at all", id="text"),
        pytest.param(msgpack.packb({"rid": 1, "tasks": [1, 2, 3]})[:-1], id="truncated"),
        pytest.param(b"\x81\xa3rid", id="map-missing-value"),
        pytest.param(msgpack.packb({"rid": 1}) + b"\x00", id="trailing-bytes"),
        pytest.param(msgpack.packb({"rid": 1}) * 2, id="two-maps"),
        pytest.param(msgpack.packb([1, 2]), id="array"),
        pytest.param(msgpack.packb(None), id="nil"),
        pytest.param(msgpack.packb(7), id="int"),
        pytest.param(msgpack.packb("rid"), id="str"),
        pytest.param(msgpack.packb(b"\x81"), id="bin"),
        pytest.param(msgpack.packb({1: 2, "rid": 1}), id="int-key"),
        pytest.param(msgpack.packb({None: 1, "rid": 1}), id="nil-key"),
        pytest.param(b"\x82\xa3rid\x01\x91\x01\x02", id="array-key"),
        pytest.param(b"\x82\xa3rid\x01\x81\x01\x02\x03", id="map-key"),
        pytest.param(msgpack.packb({1.5: 2, "rid": 1}), id="float-key"),
        pytest.param(msgpack.packb({"rid": 1, "x": msgpack.ExtType(1, b"abc")}), id="ext-type"),
        pytest.param(b"\x81\xa3rid\xa2\xff\xfe", id="invalid-utf8-str"),
        pytest.param(b"\x81\xa3rid\xa3\xed\xa0\x80", id="utf8-surrogate"),
    ],
)
def test_undecodable_body_is_bad_frames(body: bytes) -> None:
    rejects(lambda: decode(raw_message(body)), ErrorCode.BAD_FRAMES, rid=None)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\x91" * 100_000 + b"\xc0", id="nested-arrays"),
        pytest.param(b"\x81\xa1x" * 100_000 + b"\xc0", id="nested-maps"),
        pytest.param(b"\x82\xa3rid\x01\xa1x" + b"\x91" * 100_000 + b"\xc0", id="nested-in-valid-map"),
    ],
)
def test_deeply_nested_body_is_a_protocol_error_not_a_crash(body: bytes) -> None:
    rejects(lambda: decode(raw_message(body)), ErrorCode.BAD_FRAMES, rid=None)


def test_oversized_body_is_too_large_before_it_is_unpacked() -> None:
    body = b"\xc1" * (MAX_MESSAGE_BYTES + 1)  # would be bad_frames if it were unpacked
    error = rejects(lambda: decode(raw_message(body)), ErrorCode.TOO_LARGE, rid=None)
    assert str(MAX_MESSAGE_BYTES) in str(error)


def test_body_of_exactly_the_limit_is_accepted() -> None:
    overhead = len(msgpack.packb({"rid": 1, "x": b"\x00" * 70_000})) - 70_000
    body = {"rid": 1, "x": b"\x00" * (MAX_MESSAGE_BYTES - overhead)}
    frames = encode(Command.PING, body)
    assert len(frames[2]) == MAX_MESSAGE_BYTES
    assert decode(frames).body == body


def test_over_long_arrays_and_maps_are_refused_by_the_unpacker() -> None:
    big_array = msgpack.packb({"rid": 1, "ids": list(range(MAX_BATCH * 4 + 1))})
    rejects(lambda: decode(raw_message(big_array, b"CANCEL")), ErrorCode.BAD_FRAMES, rid=None)
    big_map = msgpack.packb({"rid": 1, **{f"k{i}": i for i in range(1024)}})
    rejects(lambda: decode(raw_message(big_map)), ErrorCode.BAD_FRAMES, rid=None)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="no-rid"),
        pytest.param({"rid": None}, id="nil"),
        pytest.param({"rid": -1}, id="negative"),
        pytest.param({"rid": -(2**63)}, id="most-negative"),
        pytest.param({"rid": True}, id="true"),
        pytest.param({"rid": False}, id="false"),
        pytest.param({"rid": 1.0}, id="float"),
        pytest.param({"rid": "1"}, id="str"),
        pytest.param({"rid": b"\x01"}, id="bin"),
        pytest.param({"rid": [1]}, id="array"),
        pytest.param({"RID": 1}, id="wrong-case"),
        pytest.param({b"rid": 1}, id="bin-key"),
    ],
)
def test_missing_or_invalid_rid_is_bad_request(body: dict[Any, Any]) -> None:
    frames = raw_message(msgpack.packb(body, use_bin_type=True))
    error = rejects(lambda: decode(frames), ErrorCode.BAD_REQUEST, rid=None)
    assert "rid" in str(error)


@pytest.mark.parametrize(
    "command",
    [b"", b"ping", b"PING ", b"NOPE", b"\xff\xfe", b"SUBMIT\x00", b"X" * 1000, b"ERRORS"]
    + [c.value.encode() for c in sorted(REPLIES)],
)
def test_unknown_or_reply_command_is_unknown_command_with_the_rid(command: bytes) -> None:
    frames = [PROTOCOL, command, msgpack.packb({"rid": 77})]
    error = rejects(lambda: decode(frames), ErrorCode.UNKNOWN_COMMAND, rid=77)
    assert len(str(error)) < 100  # the command is shown, but cut short


# -- SUBMIT ------------------------------------------------------------------------------------


def submit(limit: int = PAYLOAD_LIMIT, **body: Any) -> list[TaskSpec]:
    return parse_submit(request(Command.SUBMIT, **body), limit)


OPTIONAL = [
    "priority",
    "delay",
    "max_attempts",
    "lease_timeout",
    "backoff_base",
    "backoff_max",
    "idempotency_key",
]


def test_submit_applies_defaults_for_omitted_fields() -> None:
    assert submit(queue="q", payload=[b"p"]) == [TaskSpec(queue="q", payload=b"p")]
    [spec] = submit(queue="q", payload=[b"p"])
    assert (spec.priority, spec.delay, spec.max_attempts, spec.idempotency_key) == (0, 0.0, 5, None)
    assert (spec.lease_timeout, spec.backoff_base, spec.backoff_max) == (30.0, 1.0, 300.0)


def test_submit_treats_nil_fields_and_nil_entries_as_the_default() -> None:
    assert submit(queue="q", payload=[b"p"], **dict.fromkeys(OPTIONAL)) == [TaskSpec("q", b"p")]
    columns = {name: [None, None] for name in OPTIONAL}
    assert submit(queue="q", payload=[b"a", b"b"], **columns) == [TaskSpec("q", b"a"), TaskSpec("q", b"b")]


def test_submit_applies_a_scalar_to_every_row_and_an_array_row_by_row() -> None:
    specs = submit(
        queue=["a.b:c-d_e", "Q9", "a.b:c-d_e"],
        payload=[b"\x00" * PAYLOAD_LIMIT, b"", b"3"],
        priority=[-32768, 32767, None],
        delay=1.5,
        max_attempts=1,
        lease_timeout=[0.25, None, 7],
        backoff_base=0,
        backoff_max=0.0,
        idempotency_key=["k" * 200, None, "k"],
        future_field={"anything": [1, 2]},
    )
    assert specs == [
        TaskSpec("a.b:c-d_e", b"\x00" * PAYLOAD_LIMIT, -32768, 1.5, 1, 0.25, 0.0, 0.0, "k" * 200),
        TaskSpec("Q9", b"", 32767, 1.5, 1, 30.0, 0.0, 0.0, None),
        TaskSpec("a.b:c-d_e", b"3", 0, 1.5, 1, 7.0, 0.0, 0.0, "k"),
    ]


def test_submit_converts_integer_durations_to_float() -> None:
    [spec] = submit(queue="q", payload=[b""], delay=3, lease_timeout=[10], backoff_max=60)
    for value in (spec.delay, spec.lease_timeout, spec.backoff_base, spec.backoff_max):
        assert type(value) is float
    assert (spec.delay, spec.lease_timeout, spec.backoff_max) == (3.0, 10.0, 60.0)


def test_submit_accepts_a_full_batch() -> None:
    payloads = [str(i).encode() for i in range(MAX_BATCH)]
    assert [s.payload for s in submit(queue="q", payload=payloads)] == payloads
    specs = submit(queue=["q"] * MAX_BATCH, payload=payloads, priority=list(range(MAX_BATCH)))
    assert [s.priority for s in specs] == list(range(MAX_BATCH))


def test_submit_body_sends_a_shared_field_once_and_round_trips() -> None:
    """The client's encoding: one value for all rows goes as a scalar, a default not at all."""
    same = [TaskSpec("q", b"%d" % i, priority=2) for i in range(3)]
    assert submit_body(same) == {"payload": [b"0", b"1", b"2"], "queue": "q", "priority": 2}
    mixed = [TaskSpec("a", b"x", delay=1.5, idempotency_key="k"), TaskSpec("b", bytearray(b"y"))]
    body = submit_body(mixed)
    assert body == {
        "payload": [b"x", b"y"],
        "queue": ("a", "b"),
        "delay": (1.5, 0.0),
        "idempotency_key": ("k", None),
    }
    assert submit(**body) == [mixed[0], TaskSpec("b", b"y")]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param({}, ErrorCode.BAD_REQUEST, id="no-payload"),
        pytest.param({"payload": None}, ErrorCode.BAD_REQUEST, id="nil-payload"),
        pytest.param({"payload": []}, ErrorCode.BAD_REQUEST, id="empty"),
        pytest.param({"payload": b"p"}, ErrorCode.BAD_REQUEST, id="scalar-bin"),
        pytest.param({"payload": {"0": b"p"}}, ErrorCode.BAD_REQUEST, id="map"),
        pytest.param({"payload": [b"p", "str"]}, ErrorCode.BAD_REQUEST, id="str-entry"),
        pytest.param({"payload": [b"p", None]}, ErrorCode.BAD_REQUEST, id="nil-entry"),
        pytest.param({"payload": [[b"p"]]}, ErrorCode.BAD_REQUEST, id="nested"),
        pytest.param({"payload": [b""] * (MAX_BATCH + 1)}, ErrorCode.TOO_LARGE, id="too-many"),
        pytest.param({"tasks": [{"queue": "q", "payload": b""}]}, ErrorCode.BAD_REQUEST, id="conduit/1-rows"),
    ],
)
def test_submit_rejects_a_bad_payload_column(body: dict[str, Any], code: ErrorCode) -> None:
    error = rejects(lambda: submit(**{"queue": "q", **body}), code)
    assert "payload" in str(error)


@pytest.mark.parametrize("field", ["queue", *OPTIONAL])
@pytest.mark.parametrize("entries", [0, 1, 3, MAX_BATCH + 1])
def test_submit_rejects_a_column_of_another_length(field: str, entries: int) -> None:
    good = {"queue": "q", "priority": 1, "delay": 1, "max_attempts": 2, "idempotency_key": "k"}
    body = {"queue": "q", "payload": [b"", b""], field: [good.get(field, 1)] * entries}
    error = rejects(lambda: submit(**body), ErrorCode.BAD_REQUEST)
    assert repr(field) in str(error) and f"{entries} entries for 2 rows" in str(error)


BAD_TASK_FIELDS = [
    # (field, value, code); value ... means: the field is removed (a nil entry, in an array)
    ("queue", ..., ErrorCode.BAD_REQUEST),
    ("queue", None, ErrorCode.BAD_REQUEST),
    ("queue", 1, ErrorCode.BAD_REQUEST),
    ("queue", b"q", ErrorCode.BAD_REQUEST),
    ("queue", {"q": 1}, ErrorCode.BAD_REQUEST),
    ("queue", "", ErrorCode.INVALID_TASK),
    ("queue", "-q", ErrorCode.INVALID_TASK),
    ("queue", ".q", ErrorCode.INVALID_TASK),
    ("queue", "a b", ErrorCode.INVALID_TASK),
    ("queue", "a/b", ErrorCode.INVALID_TASK),
    ("queue", "q\n", ErrorCode.INVALID_TASK),
    ("queue", "é", ErrorCode.INVALID_TASK),
    ("queue", "q" * 65, ErrorCode.INVALID_TASK),
    ("priority", True, ErrorCode.BAD_REQUEST),
    ("priority", 1.0, ErrorCode.BAD_REQUEST),
    ("priority", "1", ErrorCode.BAD_REQUEST),
    ("priority", 32768, ErrorCode.INVALID_TASK),
    ("priority", -32769, ErrorCode.INVALID_TASK),
    ("priority", UINT64_MAX, ErrorCode.INVALID_TASK),
    ("delay", True, ErrorCode.BAD_REQUEST),
    ("delay", "1", ErrorCode.BAD_REQUEST),
    ("delay", b"1", ErrorCode.BAD_REQUEST),
    ("delay", -1, ErrorCode.INVALID_TASK),
    ("delay", -0.001, ErrorCode.INVALID_TASK),
    ("max_attempts", False, ErrorCode.BAD_REQUEST),
    ("max_attempts", 3.0, ErrorCode.BAD_REQUEST),
    ("max_attempts", 0, ErrorCode.INVALID_TASK),
    ("max_attempts", -5, ErrorCode.INVALID_TASK),
    ("lease_timeout", True, ErrorCode.BAD_REQUEST),
    ("lease_timeout", {"s": 30}, ErrorCode.BAD_REQUEST),
    ("lease_timeout", 0, ErrorCode.INVALID_TASK),
    ("lease_timeout", -1.0, ErrorCode.INVALID_TASK),
    ("backoff_base", False, ErrorCode.BAD_REQUEST),
    ("backoff_base", -1, ErrorCode.INVALID_TASK),
    ("backoff_max", {"s": 1}, ErrorCode.BAD_REQUEST),
    ("backoff_max", -0.5, ErrorCode.INVALID_TASK),
    ("idempotency_key", 1, ErrorCode.BAD_REQUEST),
    ("idempotency_key", b"k", ErrorCode.BAD_REQUEST),
    ("idempotency_key", True, ErrorCode.BAD_REQUEST),
    ("idempotency_key", "", ErrorCode.INVALID_TASK),
    ("idempotency_key", "a\x00b", ErrorCode.INVALID_TASK),
    ("idempotency_key", "k" * 201, ErrorCode.INVALID_TASK),
]
GOOD = {"queue": "q", "priority": 1, "delay": 1, "max_attempts": 2, "lease_timeout": 5}
GOOD |= {"backoff_base": 1, "backoff_max": 2, "idempotency_key": "k"}


@pytest.mark.parametrize(("field", "value", "code"), BAD_TASK_FIELDS)
@pytest.mark.parametrize("row", [None, 0, 2])
def test_submit_rejects_a_bad_value_as_a_scalar_or_in_any_row(
    field: str, value: Any, code: ErrorCode, row: int | None
) -> None:
    """row None: the value is the field's scalar, for every row; else it is that row's entry."""
    body: dict[str, Any] = {"queue": "q", "payload": [b"p"] * 3}
    if row is None:
        body.pop(field, None) if value is ... else body.update({field: value})
    else:
        body[field] = [GOOD[field]] * 3
        body[field][row] = None if value is ... else value
    error = rejects(lambda: submit(**body), code)
    if code is ErrorCode.BAD_REQUEST:
        assert repr(field) in str(error)
    elif row is not None:
        assert str(error).startswith(f"row {row}: ")


def test_submit_key_is_optional_and_checked() -> None:
    body = {"queue": "q", "payload": [b"x"]}
    assert parse_submit_key(Message(Command.SUBMIT, {"rid": 1, **body})) is None
    assert parse_submit_key(Message(Command.SUBMIT, {"rid": 1, **body, "key": "k"})) == "k"
    for bad in (5, "", "x" * 201, "a\x00b", b"k", ["k"]):
        with pytest.raises(ProtocolError) as err:
            parse_submit_key(Message(Command.SUBMIT, {"rid": 1, **body, "key": bad}))
        assert err.value.code is ErrorCode.BAD_REQUEST and err.value.rid == 1


@pytest.mark.parametrize("columns", [False, True])
def test_submit_payload_limit_is_the_argument_and_the_error_suggests_a_reference(columns: bool) -> None:
    """Every row's payload is measured, also when the rest of the policy is shared and checked once."""
    extra: dict[str, Any] = {"priority": [0, 0, 0]} if columns else {}
    payloads = [b"x", b"x" * 100, b"x" * 101]
    assert submit(queue="q", payload=payloads[:2], limit=100, **(extra and {"priority": [0, 0]}))
    error = rejects(lambda: submit(queue="q", payload=payloads, limit=100, **extra), ErrorCode.INVALID_TASK)
    assert str(error).startswith("row 2: ")
    assert "101" in str(error)
    assert "100" in str(error)
    assert "reference" in str(error)
    rejects(lambda: submit(queue="q", payload=[b"x"], limit=0), ErrorCode.INVALID_TASK)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("delay", math.nan),
        ("delay", math.inf),
        ("delay", 1e300),  # now() + delay overflows PostgreSQL's interval
        ("lease_timeout", math.nan),  # passes the table's CHECK (lease_timeout > 0): NaN > 0 in SQL
        ("lease_timeout", math.inf),
        ("backoff_base", math.nan),
        ("backoff_base", math.inf),
        ("backoff_max", math.nan),
        ("backoff_max", math.inf),
        ("max_attempts", 2**31),  # the column is a 32-bit integer
        ("max_attempts", UINT64_MAX),
    ],
)
@pytest.mark.parametrize("as_array", [False, True])
def test_submit_rejects_numbers_the_store_cannot_hold(field: str, value: float, as_array: bool) -> None:
    """Such a task would fail the whole group-commit write (or every later lease of its queue),
    turning one client's bad request into errors for everyone else's."""
    with pytest.raises(ProtocolError) as caught:
        submit(queue="q", payload=[b"", b""], **{field: [None, value] if as_array else value})
    assert caught.value.code in (ErrorCode.INVALID_TASK, ErrorCode.BAD_REQUEST)
    assert caught.value.rid == RID


# -- POLL --------------------------------------------------------------------------------------


def poll(**body: Any) -> Poll:
    return parse_poll(request(Command.POLL, **{"worker": "w", "queues": ["q"], **body}))


def test_poll_applies_defaults_and_ignores_unknown_keys() -> None:
    assert poll() == Poll("w", ("q",), 1, 10.0)
    assert poll(max=None, timeout=None, extra=[1]) == Poll("w", ("q",), 1, 10.0)


def test_poll_reads_every_field() -> None:
    result = poll(worker="x" * MAX_NAME_CHARS, queues=["b", "a"], max=MAX_BATCH, timeout=MAX_POLL_TIMEOUT)
    assert result == Poll("x" * MAX_NAME_CHARS, ("b", "a"), MAX_BATCH, MAX_POLL_TIMEOUT)
    assert poll(timeout=0).timeout == 0.0
    assert type(poll(timeout=5).timeout) is float


def test_poll_reads_who_the_worker_is_when_it_says() -> None:
    result = poll(host="h" * MAX_HOST_CHARS, pid=2**32 - 1, concurrency=8)
    assert (result.host, result.pid, result.concurrency) == ("h" * MAX_HOST_CHARS, 2**32 - 1, 8)
    assert (poll(pid=0).pid, poll(host=None).host) == (0, None)


def test_pause_and_resume_name_one_valid_queue() -> None:
    assert parse_queue(request(Command.PAUSE, queue="emails")) == "emails"
    rejects(lambda: parse_queue(request(Command.RESUME)), ErrorCode.BAD_REQUEST)
    rejects(lambda: parse_queue(request(Command.PAUSE, queue=["emails"])), ErrorCode.BAD_REQUEST)
    rejects(lambda: parse_queue(request(Command.PAUSE, queue="no spaces")), ErrorCode.INVALID_TASK)


def test_poll_drops_duplicate_queues_keeping_order() -> None:
    assert poll(queues=["b", "a", "b", "c", "a"]).queues == ("b", "a", "c")


def test_poll_accepts_the_most_queues() -> None:
    queues = [f"q{i}" for i in range(MAX_QUEUES)]
    assert poll(queues=queues).queues == tuple(queues)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"worker": None}, ErrorCode.BAD_REQUEST),
        ({"worker": ""}, ErrorCode.BAD_REQUEST),
        ({"worker": "w" * (MAX_NAME_CHARS + 1)}, ErrorCode.BAD_REQUEST),
        ({"worker": b"w"}, ErrorCode.BAD_REQUEST),
        ({"worker": 1}, ErrorCode.BAD_REQUEST),
        ({"worker": True}, ErrorCode.BAD_REQUEST),
        ({"queues": None}, ErrorCode.BAD_REQUEST),
        ({"queues": []}, ErrorCode.BAD_REQUEST),
        ({"queues": "q"}, ErrorCode.BAD_REQUEST),
        ({"queues": {"q": 1}}, ErrorCode.BAD_REQUEST),
        ({"queues": [f"q{i}" for i in range(MAX_QUEUES + 1)]}, ErrorCode.BAD_REQUEST),
        ({"queues": ["q", ""]}, ErrorCode.INVALID_TASK),
        ({"queues": ["bad name"]}, ErrorCode.INVALID_TASK),
        ({"queues": ["q" * 65]}, ErrorCode.INVALID_TASK),
        ({"max": 0}, ErrorCode.BAD_REQUEST),
        ({"max": -1}, ErrorCode.BAD_REQUEST),
        ({"max": MAX_BATCH + 1}, ErrorCode.BAD_REQUEST),
        ({"max": UINT64_MAX}, ErrorCode.BAD_REQUEST),
        ({"max": True}, ErrorCode.BAD_REQUEST),
        ({"max": 2.0}, ErrorCode.BAD_REQUEST),
        ({"max": "2"}, ErrorCode.BAD_REQUEST),
        ({"timeout": MAX_POLL_TIMEOUT + 0.001}, ErrorCode.BAD_REQUEST),
        ({"timeout": 61}, ErrorCode.BAD_REQUEST),
        ({"timeout": -0.5}, ErrorCode.BAD_REQUEST),
        ({"timeout": math.nan}, ErrorCode.BAD_REQUEST),
        ({"timeout": math.inf}, ErrorCode.BAD_REQUEST),
        ({"timeout": UINT64_MAX}, ErrorCode.BAD_REQUEST),
        ({"timeout": True}, ErrorCode.BAD_REQUEST),
        ({"timeout": "1"}, ErrorCode.BAD_REQUEST),
        ({"host": ""}, ErrorCode.BAD_REQUEST),
        ({"host": "h" * (MAX_HOST_CHARS + 1)}, ErrorCode.BAD_REQUEST),
        ({"host": 1}, ErrorCode.BAD_REQUEST),
        ({"pid": -1}, ErrorCode.BAD_REQUEST),
        ({"pid": 2**32}, ErrorCode.BAD_REQUEST),
        ({"pid": "1"}, ErrorCode.BAD_REQUEST),
        ({"pid": True}, ErrorCode.BAD_REQUEST),
        ({"concurrency": 0}, ErrorCode.BAD_REQUEST),
        ({"concurrency": 1.0}, ErrorCode.BAD_REQUEST),
    ],
)
def test_poll_rejects_bad_fields(body: dict[str, Any], code: ErrorCode) -> None:
    rejects(lambda: poll(**body), code)


@pytest.mark.parametrize("missing", ["worker", "queues"])
def test_poll_rejects_missing_fields(missing: str) -> None:
    body = {"worker": "w", "queues": ["q"]}
    del body[missing]
    msg = request(Command.POLL, **body)
    error = rejects(lambda: parse_poll(msg), ErrorCode.BAD_REQUEST)
    assert repr(missing) in str(error)


@pytest.mark.parametrize("queue", [1, None, b"q", ["q"], {"q": 1}, True])
def test_poll_rejects_a_queue_that_is_not_a_string(queue: Any) -> None:
    with pytest.raises(ProtocolError) as caught:
        poll(queues=["q", queue])
    assert caught.value.code in (ErrorCode.BAD_REQUEST, ErrorCode.INVALID_TASK)
    assert caught.value.rid == RID


# -- HEARTBEAT, RELEASE, COMPLETE, FAIL ---------------------------------------------------------

SETTLING = {
    Command.HEARTBEAT: parse_acks,
    Command.RELEASE: parse_acks,
    Command.COMPLETE: parse_complete,
    Command.FAIL: parse_fail,
}
# each command's columns besides id and attempt, for two rows
EXTRA = {Command.HEARTBEAT: {}, Command.RELEASE: {}, Command.COMPLETE: {}, Command.FAIL: {"error": ["", ""]}}


def settle(command: Command, **body: Any) -> list[Any]:
    return SETTLING[command](request(command, **body))


def test_acks_read_the_id_and_attempt_columns() -> None:
    for command in (Command.HEARTBEAT, Command.RELEASE):
        got = settle(command, id=[0, UINT63_MAX], attempt=[0, 2**31 - 1], worker="w", extra={"x": 1})
        assert got == [Ack(0, 0), Ack(UINT63_MAX, 2**31 - 1)]
    full = list(range(MAX_BATCH))
    assert settle(Command.RELEASE, id=full, attempt=[1] * MAX_BATCH) == [Ack(i, 1) for i in full]


def test_complete_results_are_bin_or_nil_and_may_be_left_out() -> None:
    got = settle(Command.COMPLETE, id=[1, 3, 5], attempt=[2, 4, 6], result=[b"r", None, b""])
    assert got == [Completion(1, 2, b"r"), Completion(3, 4, None), Completion(5, 6, b"")]
    assert settle(Command.COMPLETE, id=[1, 3], attempt=[2, 4]) == [Completion(1, 2), Completion(3, 4)]
    assert settle(Command.COMPLETE, id=[1], attempt=[2], result=None) == [Completion(1, 2)]


def test_fail_reads_errors_and_retry_as_a_scalar_or_per_row() -> None:
    rows = {"id": [1, 2, 3], "attempt": [1, 1, 1], "error": ["a", "", "c"]}
    assert [f.retry for f in settle(Command.FAIL, **rows)] == [True] * 3
    assert [f.retry for f in settle(Command.FAIL, **rows, retry=False)] == [False] * 3
    assert [f.retry for f in settle(Command.FAIL, **rows, retry=[False, None, True])] == [False, True, True]
    assert settle(Command.FAIL, **rows, retry=True)[0] == Failure(1, 1, "a", True)


def test_fail_stores_nul_as_backslash_zero_and_cuts_long_text() -> None:
    """PostgreSQL cannot store NUL: the broker writes the two characters \\0 instead."""
    long = "€" * (MAX_ERROR_CHARS + 5)
    nuls = "\x00" * MAX_ERROR_CHARS
    got = settle(Command.FAIL, id=[1, 2, 3], attempt=[1, 1, 1], error=["a\x00b", long, nuls])
    assert [f.error for f in got] == ["a\\0b", "€" * MAX_ERROR_CHARS, "\\0" * (MAX_ERROR_CHARS // 2)]


@pytest.mark.parametrize("command", sorted(SETTLING))
@pytest.mark.parametrize(
    ("change", "code"),
    [
        pytest.param({"id": ...}, ErrorCode.BAD_REQUEST, id="no-id"),
        pytest.param({"id": None}, ErrorCode.BAD_REQUEST, id="nil-id"),
        pytest.param({"id": []}, ErrorCode.BAD_REQUEST, id="empty"),
        pytest.param({"id": 1}, ErrorCode.BAD_REQUEST, id="scalar-id"),
        pytest.param({"id": {"1": 1}}, ErrorCode.BAD_REQUEST, id="map"),
        pytest.param({"id": b"\x01\x01"}, ErrorCode.BAD_REQUEST, id="bin"),
        pytest.param({"attempt": ...}, ErrorCode.BAD_REQUEST, id="no-attempt"),
        pytest.param({"attempt": 1}, ErrorCode.BAD_REQUEST, id="scalar-attempt"),
        pytest.param({"attempt": [1]}, ErrorCode.BAD_REQUEST, id="short-attempt"),
        pytest.param({"attempt": [1, 1, 1]}, ErrorCode.BAD_REQUEST, id="long-attempt"),
        pytest.param({"id": [1, -1]}, ErrorCode.BAD_REQUEST, id="negative-id"),
        pytest.param({"attempt": [1, -1]}, ErrorCode.BAD_REQUEST, id="negative-attempt"),
        pytest.param({"id": [1, 2**63]}, ErrorCode.BAD_REQUEST, id="id-2**63"),
        pytest.param({"id": [1, UINT64_MAX]}, ErrorCode.BAD_REQUEST, id="id-2**64-1"),
        pytest.param({"attempt": [1, 2**31]}, ErrorCode.BAD_REQUEST, id="attempt-2**31"),
        pytest.param({"attempt": [1, UINT63_MAX]}, ErrorCode.BAD_REQUEST, id="attempt-2**63-1"),
        pytest.param({"id": [1, True]}, ErrorCode.BAD_REQUEST, id="bool-id"),
        pytest.param({"attempt": [1, False]}, ErrorCode.BAD_REQUEST, id="bool-attempt"),
        pytest.param({"id": [1, 1.0]}, ErrorCode.BAD_REQUEST, id="float-id"),
        pytest.param({"id": [1, "1"]}, ErrorCode.BAD_REQUEST, id="str-id"),
        pytest.param({"id": [1, None]}, ErrorCode.BAD_REQUEST, id="nil-entry"),
        pytest.param({"id": [[1, 1], [2, 1]]}, ErrorCode.BAD_REQUEST, id="conduit/1-rows"),
        pytest.param({"id": [1] * (MAX_BATCH + 1)}, ErrorCode.TOO_LARGE, id="too-many"),
    ],
)
def test_settling_rejects_bad_columns(command: Command, change: dict[str, Any], code: ErrorCode) -> None:
    """tasks.attempt is a 32-bit integer: a larger attempt would fail the broker's whole
    group-commit write (`integer out of range`), so every other request in that batch with it."""
    body = {"id": [1, 2], "attempt": [1, 1], **EXTRA[command]}
    for name, value in change.items():
        body.pop(name) if value is ... else body.update({name: value})
    rejects(lambda: settle(command, **body), code)


@pytest.mark.parametrize(
    "result",
    [b"r", "text", [b"r"], [b"r", b"r", b"r"], [b"r", "text"], [b"r", 0], [b"r", True], [b"r", [b"r"]]],
)
def test_complete_rejects_a_result_that_is_not_bin_or_nil_per_row(result: Any) -> None:
    msg = request(Command.COMPLETE, id=[9, 8], attempt=[1, 1], result=result)
    error = rejects(lambda: parse_complete(msg), ErrorCode.BAD_REQUEST)
    assert "'result'" in str(error)


@pytest.mark.parametrize(
    "change",
    [
        {"error": ...},
        {"error": None},
        {"error": "e"},
        {"error": ["e"]},
        {"error": ["e", b"e"]},
        {"error": ["e", None]},
        {"error": ["e", 5]},
        {"retry": 1},
        {"retry": 0},
        {"retry": "true"},
        {"retry": [True]},
        {"retry": [True, 1]},
        {"retry": [True, "false"]},
    ],
)
def test_fail_rejects_a_bad_error_or_retry(change: dict[str, Any]) -> None:
    body = {"id": [9, 8], "attempt": [1, 1], "error": ["e", "e"]}
    for name, value in change.items():
        body.pop(name) if value is ... else body.update({name: value})
    error = rejects(lambda: parse_fail(request(Command.FAIL, **body)), ErrorCode.BAD_REQUEST)
    assert repr(next(iter(change))) in str(error)


# -- replies as columns ------------------------------------------------------------------------


def test_deliver_body_is_columns_and_reads_back() -> None:
    rows = [(7, 1, "q", b"a", 0, 0, 5, 30.0), (2**40, 3, "r", b"", -1, 2, 9, 0.5)]
    body = deliver_body(8, "b1", rows)
    assert body == {
        "rid": 8,
        "broker": "b1",
        "id": (7, 2**40),
        "attempt": (1, 3),
        "queue": ("q", "r"),
        "payload": (b"a", b""),
        "priority": (0, -1),
        "failures": (0, 2),
        "max_attempts": (5, 9),
        "lease_timeout": (30.0, 0.5),
    }
    delivery = parse_deliver(decode(encode(Command.DELIVER, body), allowed=REPLIES))
    assert delivery == Delivery("b1", *([*column] for column in zip(*rows, strict=True)))
    empty = deliver_body(9, "b1", [])
    assert {k: v for k, v in empty.items() if k not in ("rid", "broker")} == dict.fromkeys(
        DELIVER_COLUMNS, ()
    )
    assert parse_deliver(decode(encode(Command.DELIVER, empty), allowed=REPLIES)).id == []


@pytest.mark.parametrize(
    "change", [{"id": ...}, {"payload": None}, {"queue": "q"}, {"attempt": [1, 1]}, {"lease_timeout": {}}]
)
def test_a_deliver_without_its_columns_is_a_protocol_error(change: dict[str, Any]) -> None:
    body = deliver_body(8, "b1", [(7, 1, "q", b"a", 0, 0, 5, 30.0)])
    for name, value in change.items():
        body.pop(name) if value is ... else body.update({name: value})
    with pytest.raises(ProtocolError):
        parse_deliver(decode(encode(Command.DELIVER, body), allowed=REPLIES))


def test_report_body_makes_columns_from_rows_and_the_broker_reads_them_back() -> None:
    assert report_body(Command.HEARTBEAT, [(1, 2), (3, 4)]) == {"id": (1, 3), "attempt": (2, 4)}
    assert report_body(Command.COMPLETE, [(1, 2, None), (3, 4, None)]) == {"id": (1, 3), "attempt": (2, 4)}
    both = report_body(Command.COMPLETE, [(1, 2, b"r"), (3, 4, None)])
    assert parse_complete(request(Command.COMPLETE, **both)) == [Completion(1, 2, b"r"), Completion(3, 4)]
    same = report_body(Command.FAIL, [(1, 2, "e", True), (3, 4, "f", True)])
    assert same == {"id": (1, 3), "attempt": (2, 4), "error": ("e", "f"), "retry": True}
    mixed = report_body(Command.FAIL, [(1, 2, "e", True), (3, 4, "f", False)])
    assert parse_fail(request(Command.FAIL, **mixed)) == [Failure(1, 2, "e", True), Failure(3, 4, "f", False)]


def test_results_body_is_columns() -> None:
    infos = [TaskInfo(1, "completed", 2, b"r", "earlier", None), TaskInfo(9, None, None, None, None, None)]
    assert results_body(5, infos) == {
        "rid": 5,
        "id": [1, 9],
        "state": ["completed", None],
        "attempt": [2, None],
        "result": [b"r", None],
        "error": ["earlier", None],
    }


# -- CANCEL, RESULT ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [Command.CANCEL, Command.RESULT])
def test_ids_accepts_unsigned_63_bit_ids(command: Command) -> None:
    ids = [0, 1, 2**32, UINT63_MAX, 1]
    assert parse_ids(request(command, ids=ids, extra=None)) == ids
    full = list(range(MAX_BATCH))
    assert parse_ids(request(command, ids=full)) == full


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param({}, ErrorCode.BAD_REQUEST, id="missing"),
        pytest.param({"ids": None}, ErrorCode.BAD_REQUEST, id="nil"),
        pytest.param({"ids": []}, ErrorCode.BAD_REQUEST, id="empty"),
        pytest.param({"ids": 1}, ErrorCode.BAD_REQUEST, id="scalar"),
        pytest.param({"ids": {"1": 1}}, ErrorCode.BAD_REQUEST, id="map"),
        pytest.param({"ids": b"\x01"}, ErrorCode.BAD_REQUEST, id="bin"),
        pytest.param({"ids": [1, -1]}, ErrorCode.BAD_REQUEST, id="negative"),
        pytest.param({"ids": [1, -(2**63)]}, ErrorCode.BAD_REQUEST, id="most-negative"),
        pytest.param({"ids": [1, 2**63]}, ErrorCode.BAD_REQUEST, id="2**63"),
        pytest.param({"ids": [1, UINT64_MAX]}, ErrorCode.BAD_REQUEST, id="2**64-1"),
        pytest.param({"ids": [1, True]}, ErrorCode.BAD_REQUEST, id="true"),
        pytest.param({"ids": [False]}, ErrorCode.BAD_REQUEST, id="false"),
        pytest.param({"ids": [1.0]}, ErrorCode.BAD_REQUEST, id="float"),
        pytest.param({"ids": ["1"]}, ErrorCode.BAD_REQUEST, id="str"),
        pytest.param({"ids": [None]}, ErrorCode.BAD_REQUEST, id="nil-id"),
        pytest.param({"ids": [[1]]}, ErrorCode.BAD_REQUEST, id="nested"),
        pytest.param({"ids": list(range(MAX_BATCH + 1))}, ErrorCode.TOO_LARGE, id="too-many"),
    ],
)
@pytest.mark.parametrize("command", [Command.CANCEL, Command.RESULT])
def test_ids_rejects_bad_ids(command: Command, body: dict[str, Any], code: ErrorCode) -> None:
    msg = request(command, **body)
    rejects(lambda: parse_ids(msg), code)


# -- ERROR replies -----------------------------------------------------------------------------


def test_error_frames_decode_as_an_error_reply() -> None:
    msg = decode(error_frames(ErrorCode.BUSY, "retry shortly", 12), allowed=frozenset({Command.ERROR}))
    assert msg == Message(Command.ERROR, {"rid": 12, "code": "busy", "message": "retry shortly"})


def test_error_frames_without_a_rid_decode_with_rid_minus_one() -> None:
    """The reply to a message whose rid could not be read: rid is nil, so no request matches it."""
    frames = error_frames(ErrorCode.BAD_FRAMES, "garbled", None)
    assert msgpack.unpackb(frames[2]) == {"rid": None, "code": "bad_frames", "message": "garbled"}
    msg = decode(frames, allowed=REPLIES)
    assert msg.command is Command.ERROR
    assert msg.body["rid"] is None
    assert msg.rid == -1


@pytest.mark.parametrize("command", sorted(REPLIES - {Command.ERROR}))
def test_only_an_error_reply_may_have_a_nil_rid(command: Command) -> None:
    frames = encode(command, {"rid": None, **REPLY_BODIES[command]})
    rejects(lambda: decode(frames, allowed=REPLIES), ErrorCode.BAD_REQUEST, rid=None)


@pytest.mark.parametrize("rid", [-1, True, "1", 1.0])
def test_an_error_reply_with_a_bad_rid_is_bad_request(rid: Any) -> None:
    frames = encode(Command.ERROR, {"rid": rid, "code": "busy", "message": "m"})
    rejects(lambda: decode(frames, allowed=REPLIES), ErrorCode.BAD_REQUEST, rid=None)


def test_a_nil_rid_error_sent_as_a_request_is_an_unknown_command() -> None:
    frames = error_frames(ErrorCode.BUSY, "m", None)
    rejects(lambda: decode(frames), ErrorCode.UNKNOWN_COMMAND, rid=None)


def test_a_protocol_error_round_trips_into_an_error_reply() -> None:
    """What the broker does with a bad request: the reply names the code and echoes the rid."""
    msg = request(Command.CANCEL, ids=[-1])
    with pytest.raises(ProtocolError) as caught:
        parse_ids(msg)
    reply = decode(error_frames(caught.value.code, str(caught.value), caught.value.rid), allowed=REPLIES)
    assert reply.command is Command.ERROR
    assert reply.rid == RID
    assert reply.body["code"] == "bad_request"
    assert reply.body["message"] == str(caught.value)


# -- properties --------------------------------------------------------------------------------

# Modest example counts keep the whole file to a few seconds; no deadline, so no timing flakiness.
PROPERTY = settings(max_examples=200, deadline=None)
HEAVY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELD_NAMES = [
    "rid",
    "id",
    "attempt",
    "result",
    "error",
    "retry",
    "ids",
    "worker",
    "queues",
    "max",
    "timeout",
    "queue",
    "payload",
    "priority",
    "delay",
    "max_attempts",
    "lease_timeout",
    "backoff_base",
    "backoff_max",
    "idempotency_key",
    "key",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=UINT64_MAX),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, UINT64_MAX, MAX_BATCH, MAX_BATCH + 1]),
    st.floats(),
    st.text(max_size=70),
    st.sampled_from(["q", "", "-", "w", "a" * 64, "a" * 65]),
    st.binary(max_size=40),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(keys, children, max_size=6),
    ),
    max_leaves=12,
)
# Bodies that often get past decode (a valid rid) and deep into the parse functions.
bodies = st.builds(
    lambda rid, rest: {**rest, "rid": rid} if rid is not ... else rest,
    st.one_of(st.integers(min_value=0, max_value=UINT64_MAX), st.just(...), scalars),
    st.dictionaries(keys, values, max_size=6),
)


def parse(msg: Message) -> object:
    """What the broker runs on a decoded request."""
    match msg.command:
        case Command.SUBMIT:
            return parse_submit(msg, PAYLOAD_LIMIT)
        case Command.POLL:
            return parse_poll(msg)
        case Command.HEARTBEAT | Command.RELEASE | Command.COMPLETE | Command.FAIL:
            return SETTLING[msg.command](msg)
        case Command.CANCEL | Command.RETRY | Command.RESULT:
            return parse_ids(msg)
        case Command.PAUSE | Command.RESUME:
            return parse_queue(msg)
        case Command.PING | Command.WORKERS | Command.STATS:
            return msg.rid
        case command if command in OPERATIONS:
            return parse_operation(msg)
    raise AssertionError(msg.command)


def check_parsed(msg: Message, parsed: object) -> None:
    """What a successful parse promises the broker."""
    rid = msg.rid
    assert 0 <= rid <= UINT64_MAX
    match msg.command:
        case Command.SUBMIT:
            assert isinstance(parsed, list)
            assert 1 <= len(parsed) <= MAX_BATCH
            for spec in parsed:
                assert isinstance(spec, TaskSpec)
                spec.validate(PAYLOAD_LIMIT)
                assert isinstance(spec.payload, bytes)
                assert type(spec.priority) is int
                assert type(spec.max_attempts) is int
        case Command.POLL:
            assert isinstance(parsed, Poll)
            assert 1 <= len(parsed.queues) <= MAX_QUEUES
            assert 0 < len(parsed.worker) <= MAX_NAME_CHARS
            assert 1 <= parsed.max_tasks <= MAX_BATCH
            assert 0 <= parsed.timeout <= MAX_POLL_TIMEOUT
            assert parsed.host is None or 0 < len(parsed.host) <= MAX_HOST_CHARS
            assert parsed.pid is None or 0 <= parsed.pid < 2**32
            assert parsed.concurrency is None or 1 <= parsed.concurrency < 2**31
        case Command.PAUSE | Command.RESUME:
            assert isinstance(parsed, str)
            check_queue_name(parsed)
        case Command.CANCEL | Command.RETRY | Command.RESULT:
            assert isinstance(parsed, list)
            assert 1 <= len(parsed) <= MAX_BATCH
            assert all(type(i) is int and 0 <= i <= UINT63_MAX for i in parsed)
        case Command.PING | Command.WORKERS | Command.STATS:
            pass
        case command if command in OPERATIONS:
            assert isinstance(parsed, Operation) and parsed.command is command
            queue, state = parsed.args.get("queue"), parsed.args.get("state")
            assert queue is None or QUEUE_NAME.match(queue)
            assert state is None or state in STATES
            assert 1 <= parsed.args.get("limit", 1) <= MAX_BATCH
            ids = parsed.args.get("ids", [1])
            assert 1 <= len(ids) <= MAX_BATCH and all(type(i) is int and 0 <= i <= UINT63_MAX for i in ids)
        case _:
            assert isinstance(parsed, list)
            assert 1 <= len(parsed) <= MAX_BATCH
            kind = {Command.COMPLETE: Completion, Command.FAIL: Failure}.get(msg.command, Ack)
            for row in parsed:
                assert type(row) is kind
                assert type(row.id) is int and 0 <= row.id <= UINT63_MAX
                assert type(row.attempt) is int and 0 <= row.attempt < 2**31
                if isinstance(row, Completion):
                    assert row.result is None or type(row.result) is bytes
                if isinstance(row, Failure):
                    assert type(row.error) is str and "\x00" not in row.error
                    assert len(row.error) <= MAX_ERROR_CHARS and type(row.retry) is bool


@PROPERTY
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_any_frames_decode_or_raise_protocol_error(frames: list[bytes]) -> None:
    try:
        msg = decode(frames)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        return
    assert len(frames) == 3 and frames[0] == PROTOCOL  # only such frames can decode
    assert msg.command in REQUESTS


@PROPERTY
@given(
    st.lists(st.binary(max_size=64), min_size=3, max_size=3).map(lambda f: [PROTOCOL, *f[1:]]),
    st.sampled_from(sorted(REQUESTS)),
)
def test_random_bodies_under_a_valid_header_never_crash(frames: list[bytes], command: Command) -> None:
    frames[1] = command.value.encode()
    try:
        msg = decode(frames)
    except ProtocolError as exc:
        assert exc.rid is None
        return
    try:
        parse(msg)
    except ProtocolError as exc:
        assert exc.rid == msg.rid


@HEAVY
@given(bodies, st.sampled_from(sorted(REQUESTS)))
def test_any_msgpack_body_parses_or_raises_protocol_error(body: dict[str, Any], command: Command) -> None:
    try:
        msg = decode(encode(command, body))
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST  # only the rid can be wrong in a valid encoding
        assert exc.rid is None
        rid = body.get("rid")
        assert not isinstance(rid, int) or isinstance(rid, bool) or rid < 0
        return
    assert msg.rid == body["rid"]
    try:
        parsed = parse(msg)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.rid == msg.rid  # past the rid check, every error names the request
        return
    check_parsed(msg, parsed)


# Near-valid items: mostly well-formed, with any field liable to be junk (nil counts as missing).
junk = scalars.map(lambda value: value)  # mapped, so `one_of` does not flatten its branches in


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.integers(0, 7).flatmap(lambda n: junk if n == 0 else good)


uints = st.integers(min_value=0, max_value=UINT63_MAX) | st.sampled_from([0, 1, UINT63_MAX, 2**63])
numbers = st.integers(-2, 10**6) | st.floats(-1, 1e6)
attempts = st.integers(0, 2**31 - 1) | st.sampled_from([0, 2**31 - 1, 2**31])


def column(entry: st.SearchStrategy[Any], rows: int, scalar: bool = True) -> st.SearchStrategy[Any]:
    """Mostly an array of one entry per row, now and then of another length or with a junk
    entry, or (where the field may be one) a scalar."""
    exact = st.lists(entry, min_size=rows, max_size=rows)
    spoilt = st.lists(mostly(entry), min_size=rows, max_size=rows)
    odd = st.lists(entry, max_size=rows + 2)
    shapes = [exact, exact, exact, spoilt, odd, *([entry, entry] if scalar else [])]
    return mostly(st.sampled_from(shapes).flatmap(lambda shape: shape))


# Per command, the columns besides the row-count one, and whether each may be a scalar.
COLUMNS: dict[Command, dict[str, tuple[st.SearchStrategy[Any], bool]]] = {
    Command.SUBMIT: {
        "queue": (st.sampled_from(["q", "a.b:c", "q" * 64, "q" * 65, "-q", "", "q"]), True),
        "priority": (st.integers(-40_000, 40_000), True),
        "delay": (numbers, True),
        "max_attempts": (st.integers(-1, 100), True),
        "lease_timeout": (numbers, True),
        "backoff_base": (numbers, True),
        "backoff_max": (numbers, True),
        "idempotency_key": (st.text(max_size=210), True),
    },
    Command.HEARTBEAT: {"attempt": (attempts, False)},
    Command.RELEASE: {"attempt": (attempts, False)},
    Command.COMPLETE: {"attempt": (attempts, False), "result": (st.none() | st.binary(max_size=8), False)},
    Command.FAIL: {
        "attempt": (attempts, False),
        "error": (st.text(max_size=8), False),
        "retry": (st.booleans(), True),
    },
}
ROW_COUNT = {
    Command.SUBMIT: ("payload", st.binary(max_size=PAYLOAD_LIMIT + 1)),
    Command.CANCEL: ("ids", uints),
}
ROW_COUNT |= {Command.RESULT: ("ids", uints)}


@st.composite
def column_bodies(draw: st.DrawFn, command: Command) -> dict[str, Any]:
    """A body of columns for `command`, mostly well formed, any part of it liable to be junk."""
    name, entry = ROW_COUNT.get(command, ("id", uints))
    rows = draw(st.integers(1, 4))
    body = {name: draw(column(entry, rows, scalar=False))}
    for field, (strategy, scalar) in COLUMNS.get(command, {}).items():
        if draw(st.integers(0, 7)) >= (1 if field in ("queue", "attempt", "error") else 5):
            body[field] = draw(column(strategy, rows, scalar))
    return body


poll_fields = st.fixed_dictionaries(
    {
        "worker": mostly(st.sampled_from(["w", "w" * MAX_NAME_CHARS, "w" * (MAX_NAME_CHARS + 1)])),
        "queues": mostly(st.lists(mostly(st.sampled_from(["q", "r", "bad name"])), max_size=MAX_QUEUES + 1)),
    },
    optional={
        "max": mostly(st.integers(-1, MAX_BATCH + 1)),
        "timeout": mostly(st.floats(-1, MAX_POLL_TIMEOUT + 1)),
        "host": mostly(st.sampled_from(["h", "h" * MAX_HOST_CHARS, "h" * (MAX_HOST_CHARS + 1), ""])),
        "pid": mostly(st.integers(-1, 2**32)),
        "concurrency": mostly(st.integers(0, 2**31)),
        "queue": mostly(st.sampled_from(["q", "bad name", "", "q" * 65])),
    },
)


@pytest.mark.parametrize("command", sorted(REQUESTS - {Command.PING}))
@settings(max_examples=40, deadline=None)
@given(fields=poll_fields, data=st.data())
def test_near_valid_requests_parse_or_raise_protocol_error(
    command: Command, fields: dict[str, Any], data: st.DataObject
) -> None:
    body = {**fields, **data.draw(column_bodies(command)), "other": data.draw(junk), "rid": RID}
    msg = decode(encode(command, body))
    try:
        parsed = parse(msg)
    except ProtocolError as exc:
        assert exc.rid == RID
        return
    check_parsed(msg, parsed)


@PROPERTY
@given(
    st.sampled_from(list(ErrorCode)),
    st.one_of(
        st.text(),
        st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(MAX_ERROR_CHARS - 2, 9000)),
    ),
    st.none() | st.integers(min_value=0, max_value=UINT64_MAX),
)
def test_error_frames_round_trip(code: ErrorCode, message: str, rid: int | None) -> None:
    msg = decode(error_frames(code, message, rid), allowed=frozenset({Command.ERROR}))
    assert msg.command is Command.ERROR
    assert msg.body["rid"] == rid
    assert msg.rid == (-1 if rid is None else rid)
    assert ErrorCode(msg.body["code"]) is code
    assert msg.body["message"] == message[:MAX_ERROR_CHARS]
    assert len(msg.body["message"]) <= MAX_ERROR_CHARS


@HEAVY
@given(bodies, st.sampled_from(sorted(REQUESTS)), st.data())
def test_truncated_body_is_bad_frames(body: dict[str, Any], command: Command, data: st.DataObject) -> None:
    """msgpack is self-delimiting: no strict prefix of an encoded map is a complete object."""
    frames = encode(command, body)
    cut = data.draw(st.integers(min_value=0, max_value=len(frames[2]) - 1), label="cut")
    truncated = [frames[0], frames[1], frames[2][:cut]]
    rejects(lambda: decode(truncated), ErrorCode.BAD_FRAMES, rid=None)


# -- the worked example of docs/PROTOCOL.md §13, byte for byte --------------------------------

DOC = dict(
    submit=(
        "85 a3 72 69 64 07 a5 71 75 65 75 65 a5 65 6d 61 69 6c a7 70 61 79 6c 6f 61 64 92 c4 05 68 65 6c"
        "6c 6f c4 02 68 69 ac 6d 61 78 5f 61 74 74 65 6d 70 74 73 03 a5 64 65 6c 61 79 92 00 3c"
    ),
    submitted=("83 a3 72 69 64 07 a3 69 64 73 92 cd 13 8b cd 13 8c a7 63 72 65 61 74 65 64 92 c3 c3"),
    poll=(
        "85 a3 72 69 64 08 a6 77 6f 72 6b 65 72 a2 77 31 a6 71 75 65 75 65 73 91 a5 65 6d 61 69 6c a3 6d"
        "61 78 02 a7 74 69 6d 65 6f 75 74 0a"
    ),
    deliver=(
        "8a a3 72 69 64 08 a6 62 72 6f 6b 65 72 aa 64 6f 63 2d 62 72 6f 6b 65 72 a2 69 64 91 cd 13 8b a7"
        "61 74 74 65 6d 70 74 91 01 a5 71 75 65 75 65 91 a5 65 6d 61 69 6c a7 70 61 79 6c 6f 61 64 91 c4"
        "05 68 65 6c 6c 6f a8 70 72 69 6f 72 69 74 79 91 00 a8 66 61 69 6c 75 72 65 73 91 00 ac 6d 61 78"
        "5f 61 74 74 65 6d 70 74 73 91 03 ad 6c 65 61 73 65 5f 74 69 6d 65 6f 75 74 91 cb 40 3e 00 00 00"
        "00 00 00"
    ),
    complete=(
        "84 a3 72 69 64 09 a2 69 64 91 cd 13 8b a7 61 74 74 65 6d 70 74 91 01 a6 72 65 73 75 6c 74 91 c4"
        "04 73 65 6e 74"
    ),
    ack=("82 a3 72 69 64 09 a8 6f 75 74 63 6f 6d 65 73 91 a2 6f 6b"),
    result=("82 a3 72 69 64 0b a3 69 64 73 92 cd 13 8b cd 13 8c"),
    results=(
        "86 a3 72 69 64 0b a2 69 64 92 cd 13 8b cd 13 8c a5 73 74 61 74 65 92 a9 63 6f 6d 70 6c 65 74 65"
        "64 a7 70 65 6e 64 69 6e 67 a7 61 74 74 65 6d 70 74 92 01 00 a6 72 65 73 75 6c 74 92 c4 04 73 65"
        "6e 74 c0 a5 65 72 72 6f 72 92 c0 c0"
    ),
    refusal=(
        "83 a3 72 69 64 0c a4 63 6f 64 65 ab 62 61 64 5f 76 65 72 73 69 6f 6e a7 6d 65 73 73 61 67 65 d9"
        "37 74 68 69 73 20 62 72 6f 6b 65 72 20 73 70 65 61 6b 73 20 63 6f 6e 64 75 69 74 2f 32 3b 20 74"
        "68 65 20 72 65 71 75 65 73 74 20 77 61 73 20 63 6f 6e 64 75 69 74 2f 31"
    ),
)


def doc_bytes(name: str) -> bytes:
    return bytes.fromhex(DOC[name])


def test_the_worked_example_of_the_protocol_page_is_what_the_code_sends() -> None:
    """docs/PROTOCOL.md §13 was captured from a broker; these keep it true of the code."""
    submit = {"rid": 7, "queue": "email", "payload": [b"hello", b"hi"], "max_attempts": 3, "delay": [0, 60]}
    assert encode(Command.SUBMIT, submit)[2] == doc_bytes("submit")
    specs = parse_submit(decode(encode(Command.SUBMIT, submit)), PAYLOAD_LIMIT)
    assert specs == [
        TaskSpec("email", b"hello", max_attempts=3),
        TaskSpec("email", b"hi", delay=60.0, max_attempts=3),
    ]
    submitted = {"rid": 7, "ids": [5003, 5004], "created": [True, True]}
    assert encode(Command.SUBMITTED, submitted)[2] == doc_bytes("submitted")
    poll = {"rid": 8, "worker": "w1", "queues": ["email"], "max": 2, "timeout": 10}
    assert encode(Command.POLL, poll)[2] == doc_bytes("poll")
    deliver = deliver_body(8, "doc-broker", [(5003, 1, "email", b"hello", 0, 0, 3, 30.0)])
    assert encode(Command.DELIVER, deliver)[2] == doc_bytes("deliver")
    complete = {"rid": 9, **report_body(Command.COMPLETE, [(5003, 1, b"sent")])}
    assert encode(Command.COMPLETE, complete)[2] == doc_bytes("complete")
    assert encode(Command.ACK, {"rid": 9, "outcomes": ["ok"]})[2] == doc_bytes("ack")
    assert encode(Command.RESULT, {"rid": 11, "ids": [5003, 5004]})[2] == doc_bytes("result")
    infos = [
        TaskInfo(5003, "completed", 1, b"sent", None, None),
        TaskInfo(5004, "pending", 0, None, None, None),
    ]
    assert encode(Command.RESULTS, results_body(11, infos))[2] == doc_bytes("results")
    with pytest.raises(ProtocolError) as caught:
        decode([PREVIOUS, b"PING", msgpack.packb({"rid": 12})])
    error = caught.value
    assert error_frames(error.code, str(error), error.rid, error.protocol) == [
        b"conduit/1",
        b"ERROR",
        doc_bytes("refusal"),
    ]
