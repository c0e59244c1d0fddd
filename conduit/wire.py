"""The wire protocol, conduit/2, as pure functions: frames in, typed messages out, and back.

No sockets here. docs/PROTOCOL.md is the specification; this module follows it. A message is
three ZeroMQ frames: the protocol frame, a command frame, and a msgpack map (the body). Every
request body carries `rid`, an unsigned integer the reply echoes. Unknown body keys are ignored.
Batches are columns, one array per field, so that a message costs per batch and not per task:
a field that is the same for every row of a SUBMIT is sent once, as a scalar.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, NamedTuple

import msgpack

from conduit.errors import ConduitError, InvalidTask
from conduit.task import (
    MAX_ATTEMPTS,
    MAX_KEY_LENGTH,
    MAX_SECONDS,
    Ack,
    Completion,
    Failure,
    TaskInfo,
    TaskSpec,
    check_queue_name,
)

PROTOCOL = b"conduit/2"
PREVIOUS = b"conduit/1"  # its peers are refused in their own framing, so that they can read why
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # whole message; set as the sockets' MAXMSGSIZE too
MAX_BATCH = 10_000  # rows, ids or results in one message
MAX_QUEUES = 64  # queues in one poll
MAX_POLL_TIMEOUT = 60.0  # seconds
MAX_ERROR_CHARS = 8_192
MAX_NAME_CHARS = 200  # worker and broker ids
MAX_LIST = 1_000  # rows in one page of LIST: at most ~8 MiB with every error at its longest
MAX_SHOW = 32  # ids in one SHOW: what a broker reads at once is bounded, payloads and all
MAX_HOST_CHARS = 255  # a POLL's host


class Command(enum.StrEnum):
    # requests (client or worker -> broker)
    SUBMIT = "SUBMIT"
    POLL = "POLL"
    HEARTBEAT = "HEARTBEAT"
    COMPLETE = "COMPLETE"
    FAIL = "FAIL"
    RELEASE = "RELEASE"
    CANCEL = "CANCEL"
    RETRY = "RETRY"
    RESULT = "RESULT"
    WORKERS = "WORKERS"
    QUEUES = "QUEUES"
    LIST = "LIST"
    SHOW = "SHOW"
    REDRIVE = "REDRIVE"
    PURGE = "PURGE"
    STATS = "STATS"
    PAUSE = "PAUSE"
    RESUME = "RESUME"
    PING = "PING"
    # replies (broker -> client or worker)
    SUBMITTED = "SUBMITTED"
    DELIVER = "DELIVER"
    ACK = "ACK"
    RESULTS = "RESULTS"
    WORKER_LIST = "WORKER_LIST"
    QUEUE_LIST = "QUEUE_LIST"
    TASK_LIST = "TASK_LIST"
    TASK_DETAILS = "TASK_DETAILS"
    DONE = "DONE"
    BROKER_STATS = "BROKER_STATS"
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
        Command.RETRY,
        Command.RESULT,
        Command.WORKERS,
        Command.QUEUES,
        Command.LIST,
        Command.SHOW,
        Command.REDRIVE,
        Command.PURGE,
        Command.STATS,
        Command.PAUSE,
        Command.RESUME,
        Command.PING,
    }
)


REPLIES = frozenset(
    {
        Command.SUBMITTED,
        Command.DELIVER,
        Command.ACK,
        Command.RESULTS,
        Command.WORKER_LIST,
        Command.QUEUE_LIST,
        Command.TASK_LIST,
        Command.TASK_DETAILS,
        Command.DONE,
        Command.BROKER_STATS,
        Command.PONG,
        Command.ERROR,
    }
)


class ErrorCode(enum.StrEnum):
    BAD_FRAMES = "bad_frames"  # wrong frame count or undecodable body
    BAD_VERSION = "bad_version"  # protocol frame is not conduit/2
    UNKNOWN_COMMAND = "unknown_command"
    BAD_REQUEST = "bad_request"  # a field is missing, of the wrong type, or out of range
    TOO_LARGE = "too_large"
    INVALID_TASK = "invalid_task"  # a task breaks a rule (queue name, payload size, ...)
    BUSY = "busy"  # the broker's write queue is full: retry later
    UNAVAILABLE = "unavailable"  # the database cannot be reached: retry later
    SHUTTING_DOWN = "shutting_down"  # retry on another broker
    INTERNAL = "internal"


class ProtocolError(ConduitError):
    """A message that breaks the protocol; `rid` is set when the request id could be read, and
    `protocol` is the version to answer in (the request's own, for a conduit/1 peer)."""

    def __init__(
        self, code: ErrorCode, message: str, rid: int | None = None, protocol: bytes = PROTOCOL
    ) -> None:
        super().__init__(message)
        self.code = code
        self.rid = rid
        self.protocol = protocol


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
        raise _wrong_version(protocol, raw, from_broker=not allowed & REQUESTS)
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
    if not no_rid and not _is_rid(rid):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "body needs rid, an unsigned integer")
    if cmd is None or cmd not in allowed:
        shown = command[:32].decode("utf-8", "replace")
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, f"unknown command {shown!r}", rid)
    return Message(cmd, body)


def _wrong_version(protocol: bytes, raw: bytes, *, from_broker: bool) -> ProtocolError:
    """A conduit/1 request is refused in conduit/1, with its rid, so that an old peer reads the
    refusal as the answer to its request; a broker's message in another version (as a peer reads
    it) means that broker is of another release."""
    old = protocol == PREVIOUS
    shown = PREVIOUS.decode() if old else repr(protocol[:32].decode("utf-8", "replace"))
    if from_broker:
        return ProtocolError(ErrorCode.BAD_VERSION, f"the broker speaks {shown}; this peer speaks conduit/2")
    rid = None
    if old and len(raw) <= MAX_MESSAGE_BYTES:
        with contextlib.suppress(ProtocolError):
            rid = _unpack(raw).get("rid")
    return ProtocolError(
        ErrorCode.BAD_VERSION,
        f"this broker speaks conduit/2; the request was {shown}",
        rid if _is_rid(rid) else None,
        PREVIOUS if old else PROTOCOL,
    )


def _is_rid(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**64


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
    # Who the worker is, for WORKERS only (optional: None when not sent).
    host: str | None = None
    pid: int | None = None
    concurrency: int | None = None


def get_field(
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


def _rows(body: dict[str, Any], name: str, rid: int) -> list[Any]:
    """The array that fixes a message's row count: 1 to MAX_BATCH entries."""
    items = get_field(body, name, list, rid)
    if not items:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {name!r} is empty", rid)
    if len(items) > MAX_BATCH:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(items)} rows in {name!r}; at most {MAX_BATCH}", rid)
    return items


def _array(body: dict[str, Any], name: str, rows: int, rid: int) -> list[Any]:
    items = get_field(body, name, list, rid)
    if len(items) != rows:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"field {name!r} has {len(items)} entries for {rows} rows", rid
        )
    return items


_NUMBER = (int, float)

# SUBMIT's task fields besides `payload`, in TaskSpec's order: name (the wire's and TaskSpec's),
# the types accepted. Each is a scalar for every row or an array with one entry per row.
_SUBMIT_FIELDS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("queue", (str,)),
    ("priority", (int,)),
    ("delay", _NUMBER),
    ("max_attempts", (int,)),
    ("lease_timeout", _NUMBER),
    ("backoff_base", _NUMBER),
    ("backoff_max", _NUMBER),
    ("idempotency_key", (str,)),  # NUL is refused by validate()
)
_DEFAULTS: dict[str, Any] = {**TaskSpec._field_defaults, "queue": ...}  # ...: required


def _per_row(body: dict[str, Any], name: str, kinds: tuple[type, ...], rows: int, rid: int) -> Any:
    """A scalar (the default if absent), or a list with an entry per row, nil entries defaulted.
    Types are checked exactly: a bool is not an int, and number fields become floats."""
    value = body.get(name)
    default = _DEFAULTS[name]
    if value is None:
        if default is ...:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"missing field {name!r}", rid)
        return default
    floats = kinds is _NUMBER
    if type(value) is not list:
        if type(value) not in kinds:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {name!r} has the wrong type", rid)
        return float(value) if floats else value
    _array(body, name, rows, rid)
    if not all(type(v) in kinds for v in value):
        if any(v is None for v in value) and default is ...:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {name!r} has a nil entry", rid)
        if not all(v is None or type(v) in kinds for v in value):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {name!r} has an entry of the wrong type", rid)
        value = [default if v is None else v for v in value]
    return [float(v) for v in value] if floats else value


def parse_submit(msg: Message, max_payload_bytes: int) -> list[TaskSpec]:
    """The tasks of a SUBMIT, every one checked; a policy shared by all rows is checked once."""
    rid, body = msg.rid, msg.body
    payloads = _rows(body, "payload", rid)
    if not all(type(p) is bytes for p in payloads):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'payload' must be an array of bin", rid)
    rows = len(payloads)
    fields = [_per_row(body, name, kinds, rows, rid) for name, kinds in _SUBMIT_FIELDS]
    if not any(type(f) is list for f in fields):
        queue, *policy = fields
        _check(TaskSpec(queue, b"", *policy), max_payload_bytes, rid)
        specs = [TaskSpec(queue, p, *policy) for p in payloads]
        for row, payload in enumerate(payloads):
            if len(payload) > max_payload_bytes:
                _check(specs[row], max_payload_bytes, rid, row)
        return specs
    queue, *policy = (f if type(f) is list else repeat(f, rows) for f in fields)
    specs = list(map(TaskSpec, queue, payloads, *policy))
    for row, spec in enumerate(specs):
        _check(spec, max_payload_bytes, rid, row)
    return specs


def _check(spec: TaskSpec, max_payload_bytes: int, rid: int, row: int | None = None) -> None:
    try:
        spec.validate(max_payload_bytes)
    except InvalidTask as exc:
        where = "" if row is None else f"row {row}: "
        raise ProtocolError(ErrorCode.INVALID_TASK, f"{where}{exc}", rid) from None


def parse_submit_key(msg: Message) -> str | None:
    """The key naming a whole SUBMIT, if it has one: a retry with it inserts nothing twice."""
    key = get_field(msg.body, "key", str, msg.rid, None)
    if key is not None and (not 0 < len(key) <= MAX_KEY_LENGTH or "\x00" in key):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"field 'key' must be 1 to {MAX_KEY_LENGTH} characters, none NUL", msg.rid
        )
    return key


def parse_poll(msg: Message) -> Poll:
    rid = msg.rid
    worker = _name(msg.body, "worker", rid)
    queues = get_field(msg.body, "queues", list, rid)
    if not 0 < len(queues) <= MAX_QUEUES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"poll 1 to {MAX_QUEUES} queues", rid)
    for queue in queues:
        check_queue(queue, rid)
    max_tasks = get_field(msg.body, "max", int, rid, 1)
    timeout = float(get_field(msg.body, "timeout", (int, float), rid, 10.0))
    if not 1 <= max_tasks <= MAX_BATCH or not 0 <= timeout <= MAX_POLL_TIMEOUT:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"max must be 1..{MAX_BATCH} and timeout 0..{MAX_POLL_TIMEOUT}", rid
        )
    body = msg.body
    host = pid = concurrency = None
    if body.get("host") is not None:
        host = _name(body, "host", rid, MAX_HOST_CHARS)
    if body.get("pid") is not None:
        pid = _bounded(body, "pid", rid, 0, 2**32 - 1)
    if body.get("concurrency") is not None:
        concurrency = _bounded(body, "concurrency", rid, 1, 2**31 - 1)
    return Poll(worker, tuple(dict.fromkeys(queues)), max_tasks, timeout, host, pid, concurrency)


def _bounded(body: dict[str, Any], name: str, rid: int, low: int, high: int) -> int:
    value: int = get_field(body, name, int, rid)
    if not low <= value <= high:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be {low} to {high}", rid)
    return value


def parse_queue(msg: Message) -> str:
    """PAUSE, RESUME, REDRIVE and PURGE: {queue}."""
    queue: str = get_field(msg.body, "queue", str, msg.rid)
    check_queue(queue, msg.rid)
    return queue


def _deliveries(msg: Message) -> tuple[list[int], list[int]]:
    """The `id` and `attempt` columns every settling request starts with."""
    rid = msg.rid
    ids = _rows(msg.body, "id", rid)
    attempts = _array(msg.body, "attempt", len(ids), rid)
    if not all(type(i) is int and 0 <= i < 2**63 for i in ids):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'id' must hold task ids, 0..2^63-1", rid)
    if not all(type(a) is int and 0 <= a <= MAX_ATTEMPTS for a in attempts):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field 'attempt' must hold 0..{MAX_ATTEMPTS}", rid)
    return ids, attempts


def parse_acks(msg: Message) -> list[Ack]:
    """HEARTBEAT and RELEASE: {id: [...], attempt: [...]}."""
    return list(map(Ack, *_deliveries(msg)))


def parse_complete(msg: Message) -> list[Completion]:
    """COMPLETE: id and attempt, and `result` (bin or nil per row; absent: all nil)."""
    ids, attempts = _deliveries(msg)
    if msg.body.get("result") is None:
        return list(map(Completion, ids, attempts))
    results = _array(msg.body, "result", len(ids), msg.rid)
    if not all(r is None or type(r) is bytes for r in results):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'result' must hold bin or nil", msg.rid)
    return list(map(Completion, ids, attempts, results))


def parse_fail(msg: Message) -> list[Failure]:
    """FAIL: id, attempt, `error` (str per row, NUL shown as `\\0`, then cut to MAX_ERROR_CHARS:
    PostgreSQL cannot store NUL) and `retry` (bool, or one per row; default true)."""
    ids, attempts = _deliveries(msg)
    errors = _array(msg.body, "error", len(ids), msg.rid)
    if not all(type(e) is str for e in errors):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'error' must hold str", msg.rid)
    retry = msg.body.get("retry")
    if retry is None or type(retry) is bool:
        retries: Any = repeat(retry is not False)
    else:
        retries = _array(msg.body, "retry", len(ids), msg.rid)
        if not all(r is None or type(r) is bool for r in retries):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'retry' must be bool or hold bool", msg.rid)
        retries = [r is not False for r in retries]
    texts = (e.replace("\x00", "\\0")[:MAX_ERROR_CHARS] for e in errors)
    return list(map(Failure, ids, attempts, texts, retries))


def parse_running(msg: Message) -> int | None:
    """HEARTBEAT's optional `running`: how many of the tasks it lists the worker runs now (the
    rest it holds prefetched), for WORKERS; None when absent."""
    running: int | None = get_field(msg.body, "running", int, msg.rid, None)
    if running is not None and not 0 <= running <= MAX_BATCH:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"running must be 0 to {MAX_BATCH}", msg.rid)
    return running


def parse_elapsed(msg: Message, rows: int) -> list[float | None] | None:
    """COMPLETE's and FAIL's optional `elapsed`: seconds each run took as its worker measured it
    (number or nil per row, 0 to MAX_SECONDS); None when absent."""
    elapsed = msg.body.get("elapsed")
    if elapsed is None:
        return None
    values = _array(msg.body, "elapsed", rows, msg.rid)
    kinds = set(map(type, values))  # checked in C: a worker sends this with every report
    numbers = [v for v in values if v is not None] if type(None) in kinds else values
    kinds.discard(type(None))
    if numbers and not (
        kinds <= {float, int}
        and min(numbers) >= 0
        and max(numbers) <= MAX_SECONDS
        and math.isfinite(sum(numbers))  # NaN escapes min and max
    ):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"field 'elapsed' must hold seconds, 0 to {MAX_SECONDS:g}, or nil", msg.rid
        )
    return values if kinds <= {float} else [None if v is None else float(v) for v in values]


def parse_ids(msg: Message) -> list[int]:
    ids = _rows(msg.body, "ids", msg.rid)
    if not all(_is_uint(i) for i in ids):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "ids must be unsigned integers", msg.rid)
    return ids


def _is_uint(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**63


def _name(body: dict[str, Any], field: str, rid: int, limit: int = MAX_NAME_CHARS) -> str:
    value: str = get_field(body, field, str, rid)
    if not 0 < len(value) <= limit or "\x00" in value:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"{field} must be 1 to {limit} characters, none of them NUL", rid
        )
    return value


def check_queue(queue: Any, rid: int) -> None:
    try:
        check_queue_name(queue)
    except InvalidTask as exc:
        raise ProtocolError(ErrorCode.INVALID_TASK, str(exc), rid) from None


def error_frames(code: ErrorCode, message: str, rid: int | None, protocol: bytes = PROTOCOL) -> list[bytes]:
    body = {"rid": rid, "code": code.value, "message": message[:MAX_ERROR_CHARS]}
    return [protocol, Command.ERROR.value.encode(), msgpack.packb(body, use_bin_type=True)]


# -- bodies as columns -----------------------------------------------------------------------

# A delivery as the broker collects it: id, attempt, queue, payload, priority, failures,
# max_attempts, lease_timeout; DELIVER sends each position as one column.
DeliveryRow = tuple[int, int, str, bytes, int, int, int, float]


class Delivery(NamedTuple):
    """A DELIVER's columns, as a worker reads them: entry i of each is task i."""

    broker: str
    id: list[int]
    attempt: list[int]
    queue: list[str]
    payload: list[bytes]
    priority: list[int]
    failures: list[int]
    max_attempts: list[int]
    lease_timeout: list[float]


DELIVER_COLUMNS = Delivery._fields[1:]


def deliver_body(rid: int, broker: str, rows: Sequence[DeliveryRow]) -> dict[str, Any]:
    columns = list(zip(*rows, strict=True)) or [()] * len(DELIVER_COLUMNS)
    return {"rid": rid, "broker": broker, **dict(zip(DELIVER_COLUMNS, columns, strict=True))}


def parse_deliver(msg: Message) -> Delivery:
    """A DELIVER's columns, checked to be arrays of one length (their tasks are ours: §6.2)."""
    columns: list[Any] = [msg.body.get(name) for name in DELIVER_COLUMNS]
    if not all(type(c) is list and len(c) == len(columns[0]) for c in columns):
        raise ProtocolError(ErrorCode.BAD_FRAMES, "a DELIVER needs its columns as arrays of one length")
    return Delivery(str(msg.body.get("broker") or ""), *columns)


def submit_body(specs: Sequence[TaskSpec]) -> dict[str, Any]:
    """SUBMIT's columns: a field with one value in every row goes once, as a scalar, and is left
    out at its default."""
    columns = dict(zip(TaskSpec._fields, zip(*specs, strict=True), strict=True))
    body: dict[str, Any] = {"payload": [p if type(p) is bytes else bytes(p) for p in columns.pop("payload")]}
    for name, column in columns.items():
        first = column[0]
        if column.count(first) < len(column):
            body[name] = column
        elif first != _DEFAULTS[name]:
            body[name] = first
    return body


def report_body(command: Command, rows: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    """HEARTBEAT and RELEASE rows (id, attempt), COMPLETE (id, attempt, result[, elapsed]) and FAIL
    (id, attempt, error, retry[, elapsed]), as columns; all-nil results and a common retry are
    sent once."""
    columns = list(zip(*rows, strict=True))
    body: dict[str, Any] = {"id": columns[0], "attempt": columns[1]}
    if command is Command.COMPLETE:
        if columns[2].count(None) < len(rows):
            body["result"] = columns[2]
        if len(columns) > 3:
            body["elapsed"] = columns[3]
    elif command is Command.FAIL:
        retry = columns[3]
        body["error"] = columns[2]
        body["retry"] = retry[0] if retry.count(retry[0]) == len(rows) else retry
        if len(columns) > 4:
            body["elapsed"] = columns[4]
    return body


def results_body(rid: int, infos: Sequence[TaskInfo]) -> dict[str, Any]:
    return {
        "rid": rid,
        "id": [i.id for i in infos],
        "state": [i.state for i in infos],
        "attempt": [i.attempt for i in infos],
        "result": [i.result for i in infos],
        "error": [i.error for i in infos],
    }
