"""Payloads of tasks called by name (docs/PROTOCOL.md §17): `[name, args, kwargs]` as msgpack or JSON.

The format is told by the payload's first byte, so a worker needs no setting to read either: a
JSON array starts with `[` (0x5b), a msgpack array with 0x90-0x9f, 0xdc or 0xdd, never `[`. A
result is encoded in the format of its payload, so the caller decodes it as it encoded the call.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgpack

Format = Literal["msgpack", "json"]
FORMATS: tuple[Format, ...] = ("msgpack", "json")


class PayloadError(ValueError):
    """A payload that is not a call by name, or a value its format cannot carry."""


def encode_call(fmt: Format, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    try:
        return encode_value(fmt, [name, args, kwargs])
    except PayloadError as exc:
        raise PayloadError(f"the arguments of task {name!r} cannot be sent: {exc}") from None


def decode_call(payload: bytes) -> tuple[Format, str, list[Any], dict[str, Any]]:
    """The format, task name, positional and keyword arguments of a payload."""
    fmt = format_of(payload)
    try:
        call = decode_value(fmt, payload)
    except ValueError as exc:
        raise PayloadError(f"the payload is not valid {fmt}: {exc}") from None
    if not (
        isinstance(call, list)
        and len(call) == 3
        and isinstance(call[0], str)
        and isinstance(call[1], list)
        and isinstance(call[2], dict)
    ):
        raise PayloadError("the payload is not a call by name: [name, args, kwargs]")
    return fmt, call[0], call[1], call[2]


def format_of(payload: bytes) -> Format:
    first = payload[:1]
    if first == b"[":
        return "json"
    if first and (0x90 <= first[0] <= 0x9F or first[0] in (0xDC, 0xDD)):
        return "msgpack"
    raise PayloadError("the payload is not a call by name: neither a msgpack nor a JSON array")


def peek_name(payload: bytes) -> str | None:
    """The task name of a payload, reading no more of it than needed; None if it has none."""
    try:
        if format_of(payload) == "json":
            name = decode_value("json", payload)[0]
        else:
            unpacker = msgpack.Unpacker(raw=False)
            unpacker.feed(payload)
            unpacker.read_array_header()
            name = unpacker.unpack()
    except (PayloadError, ValueError, IndexError, TypeError, msgpack.UnpackException):
        return None
    return name if isinstance(name, str) else None


def encode_value(fmt: Format, value: Any) -> bytes:
    try:
        if fmt == "json":
            return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        return bytes(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise PayloadError(f"{fmt} cannot encode {type(value).__name__}: {exc}") from None


def decode_value(fmt: Format, data: bytes) -> Any:
    if fmt == "json":
        return json.loads(data)
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ValueError(str(exc)) from None
