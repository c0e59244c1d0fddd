"""Payloads and results for a person: the same bytes as msgpack, as JSON, as text and in hex.

Conduit never decodes a payload (it is opaque bytes, usually msgpack: docs/PROTOCOL.md §17), so
the dashboard shows each reading that works and says which do not, rather than guessing one.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import msgpack

HEX_LIMIT = 4096  # bytes shown in hex; the size is always given
TEXT_LIMIT = 20_000  # characters of any decoded view


@dataclass(frozen=True)
class Preview:
    size: int
    msgpack: str | None  # None: not one msgpack value
    json: str | None
    text: str | None  # None: not UTF-8
    hex: str


def _plain(value: Any) -> Any:
    """msgpack's values as JSON can show them: bytes as text when UTF-8, else as hex."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "0x" + value.hex()
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, msgpack.ExtType):
        return f"<ext {value.code}: 0x{value.data.hex()}>"
    return value


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + f"\n... ({len(text):,} characters)"


def preview(data: bytes) -> Preview:
    as_msgpack = None
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
        as_msgpack = _cut(json.dumps(_plain(value), indent=2, ensure_ascii=False, default=repr))
    except (
        ValueError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        TypeError,
        RecursionError,
    ):
        pass
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    as_json = None
    if text is not None:
        with contextlib.suppress(ValueError, RecursionError):  # not JSON, or nested past reading
            as_json = _cut(json.dumps(json.loads(text), indent=2, ensure_ascii=False))
    lines = [
        f"{offset:08x}  {data[offset : offset + 16].hex(' '):<47}  "
        + "".join(chr(b) if 32 <= b < 127 else "." for b in data[offset : offset + 16])
        for offset in range(0, min(len(data), HEX_LIMIT), 16)
    ]
    if len(data) > HEX_LIMIT:
        lines.append(f"... ({len(data):,} bytes in all)")
    return Preview(len(data), as_msgpack, as_json, None if text is None else _cut(text), "\n".join(lines))
