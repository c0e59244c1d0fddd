"""The wire protocol, conduit/1, as pure functions: frames in, typed messages out, and back.

No sockets here. docs/PROTOCOL.md is the specification; this module follows it. A message is
three ZeroMQ frames: the protocol frame, a command frame, and a msgpack map (the body). Every
request body carries `rid`, an unsigned integer the reply echoes. Unknown body keys are ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from conduit.errors import ConduitError, InvalidTask
from conduit.task import MAX_ATTEMPTS, MAX_KEY_LENGTH, TaskSpec, check_queue_name

PROTOCOL = b"conduit/1"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # whole message; set as the sockets' MAXMSGSIZE too
MAX_BATCH = 10_000  # tasks, ids or results in one message
MAX_QUEUES = 64  # queues in one poll
MAX_POLL_TIMEOUT = 60.0  # seconds
MAX_ERROR_CHARS = 8_192
MAX_NAME_CHARS = 200  # worker and broker ids


class Command(enum.StrEnum):
    # requests (client or worker -> broker)
    SUBMIT = "SUBMIT"
    POLL = "POLL"
    HEARTBEAT = "HEARTBEAT"
    COMPLETE = "COMPLETE"
    FAIL = "FAIL"
    RELEASE = "RELEASE"
    CANCEL = "CANCEL"
    RESULT = "RESULT"
    PING = "PING"
    # replies (broker -> client or worker)
    SUBMITTED = "SUBMITTED"
    DELIVER = "DELIVER"
    ACK = "ACK"
    RESULTS = "RESULTS"
    PONG = "PONG"
    ERROR = "ERROR"
    # broadcast on a broker's PUB socket
    GOSSIP = "GOSSIP"


REQUESTS = frozenset(
    {
        Command.SUBMIT,
        Command.POLL,
        Command.HEARTBEAT,
        Command.COMPLETE,
        Command.FAIL,
        Command.RELEASE,
        Command.CANCEL,
        Command.RESULT,
        Command.PING,
    }
)


REPLIES = frozenset(
    {Command.SUBMITTED, Command.DELIVER, Command.ACK, Command.RESULTS, Command.PONG, Command.ERROR}
)


class ErrorCode(enum.StrEnum):
    BAD_FRAMES = "bad_frames"  # wrong frame count or undecodable body
    BAD_VERSION = "bad_version"  # protocol frame is not conduit/1
    UNKNOWN_COMMAND = "unknown_command"
    BAD_REQUEST = "bad_request"  # a field is missing, of the wrong type, or out of range
    TOO_LARGE = "too_large"
    INVALID_TASK = "invalid_task"  # a task breaks a rule (queue name, payload size, ...)
    BUSY = "busy"  # the broker's write queue is full: retry later
    UNAVAILABLE = "unavailable"  # the database cannot be reached: retry later
    SHUTTING_DOWN = "shutting_down"  # retry on another broker
    INTERNAL = "internal"


class ProtocolError(ConduitError):
    """A message that breaks the protocol; `rid` is set when the request id could be read."""

    def __init__(self, code: ErrorCode, message: str, rid: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.rid = rid


@dataclass(frozen=True)
class Message:
    command: Command
    body: dict[str, Any]

    @property
    def rid(self) -> int:
        """The request id; -1 where there is none (GOSSIP, or an ERROR about an unreadable request)."""
        rid = self.body.get("rid")
        return -1 if rid is None else int(rid)


def encode(command: Command, body: dict[str, Any]) -> list[bytes]:
    return [PROTOCOL, command.value.encode(), msgpack.packb(body, use_bin_type=True)]


def decode(frames: list[bytes], *, allowed: frozenset[Command] = REQUESTS) -> Message:
    """Parse one message, or raise ProtocolError saying what is wrong with it."""
    if len(frames) != 3:
        raise ProtocolError(ErrorCode.BAD_FRAMES, f"expected 3 frames, got {len(frames)}")
    protocol, command, raw = frames
    if protocol != PROTOCOL:
        shown = protocol[:32].decode("utf-8", "replace")
        raise ProtocolError(
            ErrorCode.BAD_VERSION, f"unsupported protocol {shown!r}; this broker speaks conduit/1"
        )
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"body of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    body = _unpack(raw)
    try:
        cmd: Command | None = Command(command.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        cmd = None
    rid = body.get("rid")
    # no rid: an ERROR whose request's rid was unreadable, or gossip, which answers nothing
    no_rid = (cmd is Command.ERROR and rid is None) or (cmd is Command.GOSSIP and "rid" not in body)
    if not no_rid and (not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**64):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "body needs rid, an unsigned integer")
    if cmd is None or cmd not in allowed:
        shown = command[:32].decode("utf-8", "replace")
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {shown!r}", rid)
    return Message(cmd, body)


def _unpack(raw: bytes) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_MESSAGE_BYTES,
            max_str_len=MAX_MESSAGE_BYTES,
            max_array_len=MAX_BATCH * 4,
            max_map_len=1024,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for bad input; all mean the same here
        raise ProtocolError(
            ErrorCode.BAD_FRAMES, f"body is not valid msgpack: {type(exc).__name__}"
        ) from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_FRAMES, "body must be a msgpack map")
    return body


# -- typed request bodies --------------------------------------------------------------------


@dataclass(frozen=True)
class Poll:
    worker: str
    queues: tuple[str, ...]
    max_tasks: int
    timeout: float


def _field(
    body: dict[str, Any], name: str, kind: type | tuple[type, ...], rid: int, default: Any = ...
) -> Any:
    if name not in body or body[name] is None:
        if default is ...:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"missing field {name!r}", rid)
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {name!r} has the wrong type", rid)
    if not isinstance(value, kind):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {name!r} has the wrong type", rid)
    return value


def _batch(body: dict[str, Any], name: str, rid: int) -> list[Any]:
    items = _field(body, name, list, rid)
    if not items:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {name!r} is empty", rid)
    if len(items) > MAX_BATCH:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(items)} items in {name!r}; at most {MAX_BATCH}", rid)
    return items


# SUBMIT's optional task fields: wire name, TaskSpec field, accepted types, conversion.
_TASK_OPTIONS: tuple[tuple[str, str, type | tuple[type, ...], Callable[[Any], Any]], ...] = (
    ("priority", "priority", int, int),
    ("delay", "delay", (int, float), float),
    ("max_attempts", "max_attempts", int, int),
    ("lease_timeout", "lease_timeout", (int, float), float),
    ("backoff_base", "backoff_base", (int, float), float),
    ("backoff_max", "backoff_max", (int, float), float),
    ("key", "idempotency_key", str, str),  # NUL is refused by validate()
)


def parse_submit(msg: Message, max_payload_bytes: int) -> list[TaskSpec]:
    rid = msg.rid
    specs = []
    for item in _batch(msg.body, "tasks", rid):
        if not isinstance(item, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "each task must be a map", rid)
        options = {  # only the fields present: most tasks carry two
            name: convert(_field(item, wire, kind, rid))
            for wire, name, kind, convert in _TASK_OPTIONS
            if item.get(wire) is not None
        }
        spec = TaskSpec(_field(item, "queue", str, rid), _field(item, "payload", bytes, rid), **options)
        try:
            spec.validate(max_payload_bytes)
        except InvalidTask as exc:
            raise ProtocolError(ErrorCode.INVALID_TASK, str(exc), rid) from None
        specs.append(spec)
    return specs


def parse_submit_key(msg: Message) -> str | None:
    """The key naming a whole SUBMIT, if it has one: a retry with it inserts nothing twice."""
    key = _field(msg.body, "key", str, msg.rid, None)
    if key is not None and (not 0 < len(key) <= MAX_KEY_LENGTH or "\x00" in key):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"field 'key' must be 1 to {MAX_KEY_LENGTH} characters, none NUL", msg.rid
        )
    return key


def parse_poll(msg: Message) -> Poll:
    rid = msg.rid
    worker = _name(msg.body, "worker", rid)
    queues = _field(msg.body, "queues", list, rid)
    if not 0 < len(queues) <= MAX_QUEUES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"poll 1 to {MAX_QUEUES} queues", rid)
    for queue in queues:
        _check_queue(queue, rid)
    max_tasks = _field(msg.body, "max", int, rid, 1)
    timeout = float(_field(msg.body, "timeout", (int, float), rid, 10.0))
    if not 1 <= max_tasks <= MAX_BATCH or not 0 <= timeout <= MAX_POLL_TIMEOUT:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"max must be 1..{MAX_BATCH} and timeout 0..{MAX_POLL_TIMEOUT}", rid
        )
    return Poll(worker, tuple(dict.fromkeys(queues)), max_tasks, timeout)


def parse_tasks(msg: Message, arity: int) -> list[list[Any]]:
    """Rows of HEARTBEAT and RELEASE [id, attempt], COMPLETE [id, attempt, result],
    FAIL [id, attempt, error, retry]."""
    rid = msg.rid
    rows = _batch(msg.body, "tasks", rid)
    for row in rows:
        if not isinstance(row, list) or len(row) < arity:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"each task must be an array of {arity}", rid)
        if not (_is_uint(row[0]) and _is_uint(row[1]) and row[1] <= MAX_ATTEMPTS):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"task id must be 0..2^63-1 and attempt 0..{MAX_ATTEMPTS}", rid
            )
    if arity == 3 and not all(row[2] is None or isinstance(row[2], bytes) for row in rows):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a result must be bin or nil", rid)
    if arity == 4 and not all(isinstance(r[2], str) and isinstance(r[3], bool) for r in rows):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a failure is [id, attempt, error str, retry bool]", rid)
    return rows


def parse_ids(msg: Message) -> list[int]:
    ids = _batch(msg.body, "ids", msg.rid)
    if not all(_is_uint(i) for i in ids):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "ids must be unsigned integers", msg.rid)
    return ids


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _name(body: dict[str, Any], field: str, rid: int) -> str:
    value = _field(body, field, str, rid)
    if not 0 < len(value) <= MAX_NAME_CHARS or "\x00" in value:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"{field} must be 1 to {MAX_NAME_CHARS} characters, none of them NUL", rid
        )
    return value


def _check_queue(queue: Any, rid: int) -> None:
    try:
        check_queue_name(queue)
    except InvalidTask as exc:
        raise ProtocolError(ErrorCode.INVALID_TASK, str(exc), rid) from None


def error_frames(code: ErrorCode, message: str, rid: int | None) -> list[bytes]:
    return encode(Command.ERROR, {"rid": rid, "code": code.value, "message": message[:MAX_ERROR_CHARS]})
