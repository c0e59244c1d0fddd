"""Records as columns on the wire and back (the replies of QUEUES, LIST and SHOW): one array per
field, no map per row, and datetimes as seconds since the Unix epoch, since the protocol allows
no msgpack extension types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, fields
from datetime import UTC, datetime
from typing import Any, TypeVar

T = TypeVar("T")


def columns(cls: type, rows: Sequence[Any]) -> dict[str, list[Any]]:
    """Dataclass instances of `cls` as one array per field."""
    names = [f.name for f in fields(cls)]
    out: dict[str, list[Any]] = {name: [] for name in names}
    for row in rows:
        for name, value in zip(names, astuple(row), strict=True):
            out[name].append(value.timestamp() if isinstance(value, datetime) else value)
    return out


def records(cls: type[T], body: dict[str, Any]) -> list[T]:
    """The instances of `cls` that `columns` sent: fields typed datetime come back as UTC datetimes."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    dated = {f.name for f in fields(cls) if "datetime" in str(f.type)}  # type: ignore[arg-type]
    arrays = [
        [None if v is None else datetime.fromtimestamp(v, UTC) for v in body[n]] if n in dated else body[n]
        for n in names
    ]
    return [cls(*row) for row in zip(*arrays, strict=True)]
