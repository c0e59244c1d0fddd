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

from conduit.task import TaskSpec
from conduit.wire import (
    MAX_BATCH,
    MAX_ERROR_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_NAME_CHARS,
    MAX_POLL_TIMEOUT,
    MAX_QUEUES,
    PROTOCOL,
    REQUESTS,
    Command,
    ErrorCode,
    Message,
    Poll,
    ProtocolError,
    decode,
    encode,
    error_frames,
    parse_ids,
    parse_poll,
    parse_submit,
    parse_submit_key,
    parse_tasks,
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
    Command.SUBMIT: {"tasks": [{"queue": "emails", "payload": b"\x00\xff", "priority": -3, "key": "k"}]},
    Command.POLL: {"worker": "w-1", "queues": ["a", "b"], "max": 10, "timeout": 2.5},
    Command.HEARTBEAT: {"tasks": [[1, 1], [2, 3]]},
    Command.COMPLETE: {"tasks": [[1, 1, b"result"], [2, 1, None]]},
    Command.FAIL: {"tasks": [[1, 1, "boom", True]]},
    Command.RELEASE: {"tasks": [[7, 2]]},
    Command.CANCEL: {"ids": [1, 2, 3]},
    Command.RESULT: {"ids": [UINT63_MAX]},
    Command.PING: {},
}

# decode does not look inside reply bodies; these only need to be plausible.
REPLY_BODIES: dict[Command, dict[str, Any]] = {
    Command.SUBMITTED: {"ids": [[1, True], [2, False]]},
    Command.DELIVER: {"tasks": [[1, 1, "q", b"payload", 30.0]]},
    Command.ACK: {"outcomes": ["ok", "stale"]},
    Command.RESULTS: {"tasks": [[1, "completed", 1, b"r", None, 1.5]]},
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
    assert frames[0] == PROTOCOL == b"conduit/1"
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
    "protocol", [b"conduit/2", b"conduit/10", b"conduit/", b"CONDUIT/1", b"MDPC01", b"", b"\xff" * 100]
)
def test_wrong_protocol_frame_is_bad_version(protocol: bytes) -> None:
    frames = [protocol, b"PING", msgpack.packb({"rid": 1})]
    error = rejects(lambda: decode(frames), ErrorCode.BAD_VERSION, rid=None)
    assert "conduit/1" in str(error)


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


def submit(*tasks: Any, limit: int = PAYLOAD_LIMIT, **body: Any) -> list[TaskSpec]:
    return parse_submit(request(Command.SUBMIT, tasks=list(tasks), **body), limit)


def test_submit_applies_defaults_for_omitted_fields() -> None:
    assert submit({"queue": "q", "payload": b"p"}) == [TaskSpec(queue="q", payload=b"p")]
    [spec] = submit({"queue": "q", "payload": b"p"})
    assert (spec.priority, spec.delay, spec.max_attempts, spec.idempotency_key) == (0, 0.0, 5, None)
    assert (spec.lease_timeout, spec.backoff_base, spec.backoff_max) == (30.0, 1.0, 300.0)


def test_submit_treats_nil_optional_fields_as_omitted() -> None:
    optional = ["priority", "delay", "max_attempts", "lease_timeout", "backoff_base", "backoff_max", "key"]
    task = {"queue": "q", "payload": b"p", **dict.fromkeys(optional)}
    assert submit(task) == [TaskSpec(queue="q", payload=b"p")]


def test_submit_reads_every_field_and_ignores_unknown_keys() -> None:
    task = {
        "queue": "a.b:c-d_e",
        "payload": b"\x00" * PAYLOAD_LIMIT,
        "priority": -32768,
        "delay": 1.5,
        "max_attempts": 1,
        "lease_timeout": 0.25,
        "backoff_base": 0,
        "backoff_max": 0.0,
        "key": "k" * 200,
        "future_field": {"anything": [1, 2]},
    }
    specs = submit(task, {"queue": "Q9", "payload": b"", "priority": 32767}, extra="ignored")
    assert specs == [
        TaskSpec("a.b:c-d_e", b"\x00" * PAYLOAD_LIMIT, -32768, 1.5, 1, 0.25, 0.0, 0.0, "k" * 200),
        TaskSpec("Q9", b"", 32767),
    ]


def test_submit_converts_integer_durations_to_float() -> None:
    [spec] = submit({"queue": "q", "payload": b"", "delay": 3, "lease_timeout": 10, "backoff_max": 60})
    for value in (spec.delay, spec.lease_timeout, spec.backoff_base, spec.backoff_max):
        assert type(value) is float
    assert (spec.delay, spec.lease_timeout, spec.backoff_max) == (3.0, 10.0, 60.0)


def test_submit_accepts_a_full_batch() -> None:
    specs = submit(*({"queue": "q", "payload": str(i).encode()} for i in range(MAX_BATCH)))
    assert [s.payload for s in specs] == [str(i).encode() for i in range(MAX_BATCH)]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param({}, ErrorCode.BAD_REQUEST, id="no-tasks"),
        pytest.param({"tasks": None}, ErrorCode.BAD_REQUEST, id="nil-tasks"),
        pytest.param({"tasks": []}, ErrorCode.BAD_REQUEST, id="empty"),
        pytest.param({"tasks": {"queue": "q", "payload": b""}}, ErrorCode.BAD_REQUEST, id="map"),
        pytest.param({"tasks": "q"}, ErrorCode.BAD_REQUEST, id="str"),
        pytest.param({"tasks": b"q"}, ErrorCode.BAD_REQUEST, id="bin"),
        pytest.param({"tasks": [["q", b""]]}, ErrorCode.BAD_REQUEST, id="task-array"),
        pytest.param({"tasks": [None]}, ErrorCode.BAD_REQUEST, id="task-nil"),
        pytest.param(
            {"tasks": [{"queue": "q", "payload": b""}] * (MAX_BATCH + 1)}, ErrorCode.TOO_LARGE, id="too-many"
        ),
    ],
)
def test_submit_rejects_a_bad_batch(body: dict[str, Any], code: ErrorCode) -> None:
    msg = request(Command.SUBMIT, **body)
    rejects(lambda: parse_submit(msg, PAYLOAD_LIMIT), code)


BAD_TASK_FIELDS = [
    # (field, value, code); value ... means: the field is removed
    ("queue", ..., ErrorCode.BAD_REQUEST),
    ("queue", None, ErrorCode.BAD_REQUEST),
    ("queue", 1, ErrorCode.BAD_REQUEST),
    ("queue", b"q", ErrorCode.BAD_REQUEST),
    ("queue", ["q"], ErrorCode.BAD_REQUEST),
    ("queue", "", ErrorCode.INVALID_TASK),
    ("queue", "-q", ErrorCode.INVALID_TASK),
    ("queue", ".q", ErrorCode.INVALID_TASK),
    ("queue", "a b", ErrorCode.INVALID_TASK),
    ("queue", "a/b", ErrorCode.INVALID_TASK),
    ("queue", "q\n", ErrorCode.INVALID_TASK),
    ("queue", "é", ErrorCode.INVALID_TASK),
    ("queue", "q" * 65, ErrorCode.INVALID_TASK),
    ("payload", ..., ErrorCode.BAD_REQUEST),
    ("payload", None, ErrorCode.BAD_REQUEST),
    ("payload", "text", ErrorCode.BAD_REQUEST),
    ("payload", [1, 2], ErrorCode.BAD_REQUEST),
    ("payload", 0, ErrorCode.BAD_REQUEST),
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
    ("lease_timeout", [30], ErrorCode.BAD_REQUEST),
    ("lease_timeout", 0, ErrorCode.INVALID_TASK),
    ("lease_timeout", -1.0, ErrorCode.INVALID_TASK),
    ("backoff_base", False, ErrorCode.BAD_REQUEST),
    ("backoff_base", -1, ErrorCode.INVALID_TASK),
    ("backoff_max", {"s": 1}, ErrorCode.BAD_REQUEST),
    ("backoff_max", -0.5, ErrorCode.INVALID_TASK),
    ("key", 1, ErrorCode.BAD_REQUEST),
    ("key", b"k", ErrorCode.BAD_REQUEST),
    ("key", True, ErrorCode.BAD_REQUEST),
    ("key", "", ErrorCode.INVALID_TASK),
    ("key", "k" * 201, ErrorCode.INVALID_TASK),
]


@pytest.mark.parametrize(("field", "value", "code"), BAD_TASK_FIELDS)
@pytest.mark.parametrize("position", [0, 2])
def test_submit_rejects_a_bad_field_in_any_task(
    field: str, value: Any, code: ErrorCode, position: int
) -> None:
    bad = {"queue": "q", "payload": b"p"}
    if value is ...:
        del bad[field]
    else:
        bad[field] = value
    tasks = [{"queue": "ok", "payload": b""}] * position + [bad]
    error = rejects(lambda: submit(*tasks), code)
    if code is ErrorCode.BAD_REQUEST:
        assert repr(field) in str(error)


def test_submit_key_is_optional_and_checked() -> None:
    tasks = [{"queue": "q", "payload": b"x"}]
    assert parse_submit_key(Message(Command.SUBMIT, {"rid": 1, "tasks": tasks})) is None
    assert parse_submit_key(Message(Command.SUBMIT, {"rid": 1, "tasks": tasks, "key": "k"})) == "k"
    for bad in (5, "", "x" * 201, "a\x00b", b"k"):
        with pytest.raises(ProtocolError) as err:
            parse_submit_key(Message(Command.SUBMIT, {"rid": 1, "tasks": tasks, "key": bad}))
        assert err.value.code is ErrorCode.BAD_REQUEST and err.value.rid == 1


def test_submit_payload_limit_is_the_argument_and_the_error_suggests_a_reference() -> None:
    assert submit({"queue": "q", "payload": b"x" * 100}, limit=100)[0].payload == b"x" * 100
    error = rejects(lambda: submit({"queue": "q", "payload": b"x" * 101}, limit=100), ErrorCode.INVALID_TASK)
    assert "101" in str(error)
    assert "100" in str(error)
    assert "reference" in str(error)
    rejects(lambda: submit({"queue": "q", "payload": b"x"}, limit=0), ErrorCode.INVALID_TASK)


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
def test_submit_rejects_numbers_the_store_cannot_hold(field: str, value: float) -> None:
    """Such a task would fail the whole group-commit write (or every later lease of its queue),
    turning one client's bad request into errors for everyone else's."""
    with pytest.raises(ProtocolError) as caught:
        submit({"queue": "q", "payload": b"", field: value})
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


def tasks(arity: int, rows: Any) -> list[list[Any]]:
    return parse_tasks(request(Command.HEARTBEAT, tasks=rows), arity)


def test_tasks_accepts_valid_rows_of_each_arity() -> None:
    assert tasks(2, [[0, 0], [UINT63_MAX, 2**31 - 1]]) == [[0, 0], [UINT63_MAX, 2**31 - 1]]
    assert tasks(3, [[1, 2, b"r"], [3, 4, None], [5, 6, b""]]) == [[1, 2, b"r"], [3, 4, None], [5, 6, b""]]
    assert tasks(4, [[1, 2, "err", True], [3, 4, "", False]]) == [[1, 2, "err", True], [3, 4, "", False]]


def test_tasks_ignores_unknown_body_keys_and_accepts_a_full_batch() -> None:
    msg = request(Command.RELEASE, tasks=[[i, 1] for i in range(MAX_BATCH)], extra={"x": 1})
    assert parse_tasks(msg, 2) == [[i, 1] for i in range(MAX_BATCH)]


GOOD_ROWS = {2: [1, 1], 3: [1, 1, b"r"], 4: [1, 1, "e", True]}


@pytest.mark.parametrize("arity", [2, 3, 4])
@pytest.mark.parametrize(
    ("rows", "code"),
    [
        pytest.param(..., ErrorCode.BAD_REQUEST, id="missing"),
        pytest.param(None, ErrorCode.BAD_REQUEST, id="nil"),
        pytest.param([], ErrorCode.BAD_REQUEST, id="empty"),
        pytest.param({"1": 1}, ErrorCode.BAD_REQUEST, id="map"),
        pytest.param(b"\x01\x01", ErrorCode.BAD_REQUEST, id="bin"),
        pytest.param([1, 1], ErrorCode.BAD_REQUEST, id="flat-ints"),
        pytest.param([None], ErrorCode.BAD_REQUEST, id="nil-row"),
        pytest.param([{"id": 1, "attempt": 1}], ErrorCode.BAD_REQUEST, id="map-row"),
        pytest.param([[]], ErrorCode.BAD_REQUEST, id="empty-row"),
        pytest.param([[1]], ErrorCode.BAD_REQUEST, id="short-row"),
        pytest.param([[-1, 1]], ErrorCode.BAD_REQUEST, id="negative-id"),
        pytest.param([[1, -1]], ErrorCode.BAD_REQUEST, id="negative-attempt"),
        pytest.param([[2**63, 1]], ErrorCode.BAD_REQUEST, id="id-2**63"),
        pytest.param([[UINT64_MAX, 1]], ErrorCode.BAD_REQUEST, id="id-2**64-1"),
        pytest.param([[1, 2**63]], ErrorCode.BAD_REQUEST, id="attempt-2**63"),
        pytest.param([[True, 1]], ErrorCode.BAD_REQUEST, id="bool-id"),
        pytest.param([[1, False]], ErrorCode.BAD_REQUEST, id="bool-attempt"),
        pytest.param([[1.0, 1]], ErrorCode.BAD_REQUEST, id="float-id"),
        pytest.param([["1", 1]], ErrorCode.BAD_REQUEST, id="str-id"),
        pytest.param([[b"\x01", 1]], ErrorCode.BAD_REQUEST, id="bin-id"),
        pytest.param([[None, 1]], ErrorCode.BAD_REQUEST, id="nil-id"),
        pytest.param([[1, 1]] * (MAX_BATCH + 1), ErrorCode.TOO_LARGE, id="too-many"),
    ],
)
def test_tasks_rejects_bad_rows(arity: int, rows: Any, code: ErrorCode) -> None:
    if rows is ...:
        body = {}
    elif isinstance(rows, list) and rows and code is ErrorCode.BAD_REQUEST:
        # a good row first, then the bad one: id and attempt rows get the rest of a good row
        bad = [r + GOOD_ROWS[arity][2:] if isinstance(r, list) and len(r) == 2 else r for r in rows]
        body = {"tasks": [GOOD_ROWS[arity], *bad]}
    else:
        body = {"tasks": rows}
    msg = request(Command.HEARTBEAT, **body)
    rejects(lambda: parse_tasks(msg, arity), code)


@pytest.mark.parametrize(
    "row",
    [
        [1, 1],  # no result
        [1, 1, "text"],
        [1, 1, 0],
        [1, 1, True],
        [1, 1, [b"r"]],
        [1, 1, {"r": b""}],
    ],
)
def test_complete_rejects_a_result_that_is_not_bin_or_nil(row: list[Any]) -> None:
    msg = request(Command.COMPLETE, tasks=[[9, 9, b"ok"], row])
    rejects(lambda: parse_tasks(msg, 3), ErrorCode.BAD_REQUEST)


@pytest.mark.parametrize(
    "row",
    [
        [1, 1, "e"],  # no retry
        [1, 1, b"e", True],
        [1, 1, None, True],
        [1, 1, 5, False],
        [1, 1, "e", 1],
        [1, 1, "e", 0],
        [1, 1, "e", None],
        [1, 1, "e", "true"],
    ],
)
def test_fail_rejects_a_bad_error_or_retry(row: list[Any]) -> None:
    msg = request(Command.FAIL, tasks=[[9, 9, "ok", False], row])
    rejects(lambda: parse_tasks(msg, 4), ErrorCode.BAD_REQUEST)


@pytest.mark.parametrize("arity", [2, 3, 4])
@pytest.mark.parametrize("attempt", [2**31, UINT63_MAX])
def test_tasks_rejects_attempts_the_store_cannot_hold(arity: int, attempt: int) -> None:
    """tasks.attempt is a 32-bit integer: a larger attempt fails the broker's whole group-commit
    write (`integer out of range`), so every other request in that batch gets an error."""
    msg = request(Command.HEARTBEAT, tasks=[[1, attempt, *GOOD_ROWS[arity][2:]]])
    rejects(lambda: parse_tasks(msg, arity), ErrorCode.BAD_REQUEST)


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
    "tasks",
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
item_values = scalars | st.lists(scalars, max_size=3)
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
        case Command.HEARTBEAT | Command.RELEASE:
            return parse_tasks(msg, 2)
        case Command.COMPLETE:
            return parse_tasks(msg, 3)
        case Command.FAIL:
            return parse_tasks(msg, 4)
        case Command.CANCEL | Command.RESULT:
            return parse_ids(msg)
        case Command.PING:
            return msg.rid
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
        case Command.CANCEL | Command.RESULT:
            assert isinstance(parsed, list)
            assert 1 <= len(parsed) <= MAX_BATCH
            assert all(type(i) is int and 0 <= i <= UINT63_MAX for i in parsed)
        case Command.PING:
            pass
        case _:
            assert isinstance(parsed, list)
            assert 1 <= len(parsed) <= MAX_BATCH
            for row in parsed:
                assert type(row[0]) is int and 0 <= row[0] <= UINT63_MAX
                assert type(row[1]) is int and 0 <= row[1] <= UINT63_MAX
                if msg.command is Command.COMPLETE:
                    assert row[2] is None or isinstance(row[2], bytes)
                if msg.command is Command.FAIL:
                    assert isinstance(row[2], str) and isinstance(row[3], bool)


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
submit_items = st.fixed_dictionaries(
    {
        "queue": mostly(st.sampled_from(["q", "a.b:c", "q" * 64, "q" * 65, "-q", ""])),
        "payload": mostly(st.binary(max_size=PAYLOAD_LIMIT + 1)),
    },
    optional={
        "priority": mostly(st.integers(-40_000, 40_000)),
        "delay": mostly(numbers),
        "max_attempts": mostly(st.integers(-1, 100)),
        "lease_timeout": mostly(numbers),
        "backoff_base": mostly(numbers),
        "backoff_max": mostly(numbers),
        "key": mostly(st.text(max_size=210)),
        "other": junk,
    },
)


def task_rows(*rest: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """[id, attempt, *rest], now and then cut short."""
    full = st.tuples(mostly(uints), mostly(uints), *(mostly(r) for r in rest)).map(list)
    return st.builds(lambda row, cut: row[:cut] if cut < 6 else row, full, st.integers(0, 30))


ITEMS: dict[Command, st.SearchStrategy[Any]] = {
    Command.SUBMIT: submit_items,
    Command.HEARTBEAT: task_rows(),
    Command.RELEASE: task_rows(),
    Command.COMPLETE: task_rows(st.none() | st.binary(max_size=8)),
    Command.FAIL: task_rows(st.text(max_size=8), st.booleans()),
    Command.CANCEL: mostly(uints),
    Command.RESULT: mostly(uints),
}
poll_fields = st.fixed_dictionaries(
    {
        "worker": mostly(st.sampled_from(["w", "w" * MAX_NAME_CHARS, "w" * (MAX_NAME_CHARS + 1)])),
        "queues": mostly(st.lists(mostly(st.sampled_from(["q", "r", "bad name"])), max_size=MAX_QUEUES + 1)),
    },
    optional={
        "max": mostly(st.integers(-1, MAX_BATCH + 1)),
        "timeout": mostly(st.floats(-1, MAX_POLL_TIMEOUT + 1)),
    },
)


@pytest.mark.parametrize("command", sorted(REQUESTS - {Command.PING}))
@settings(max_examples=40, deadline=None)
@given(fields=poll_fields, data=st.data())
def test_near_valid_requests_parse_or_raise_protocol_error(
    command: Command, fields: dict[str, Any], data: st.DataObject
) -> None:
    item = ITEMS.get(command, scalars)
    items = data.draw(st.lists(item, min_size=1, max_size=4) | st.lists(item | values, max_size=4))
    body = {**fields, "tasks": items, "ids": items, "rid": RID}
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
