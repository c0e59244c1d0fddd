"""Return annotations checked when a handler or task is defined: a type its serializer cannot
carry fails at registration with the reason, rather than every run failing later."""

from __future__ import annotations

import collections.abc
import types
import typing
from collections.abc import Callable
from typing import Any

_SCALARS: dict[str, tuple[Any, ...]] = {
    "msgpack": (type(None), bool, int, float, str, bytes, bytearray),
    "json": (type(None), bool, int, float, str),
    "raw": (type(None), bytes, bytearray, memoryview),
}
_CONTAINERS = (list, tuple, dict, collections.abc.Sequence, collections.abc.Mapping)


def unencodable(fn: Callable[..., Any], serializer: str) -> str | None:
    """Why `fn`'s declared return type cannot be sent with `serializer`, or None (also when it
    declares none, or one that cannot be resolved: then the value is checked when returned)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a forward reference that does not resolve here: check at run time
        return None
    if "return" not in hints:
        return None
    bad = _first_bad(hints["return"], serializer)
    if bad is None:
        return None
    allowed = {
        "raw": "bytes or None",
        "json": "None, bool, int, float, str, and lists and dicts of them",
        "msgpack": "None, bool, int, float, str, bytes, and lists and dicts of them",
    }[serializer]
    return f"returns {_name(bad)}, which {serializer} cannot carry: return {allowed}"


def _first_bad(tp: Any, serializer: str) -> Any:
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar) or tp is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return next((b for a in typing.get_args(tp) if (b := _first_bad(a, serializer)) is not None), None)
    if origin is typing.Literal:
        return None
    if serializer != "raw" and (origin in _CONTAINERS or tp in _CONTAINERS):
        return next(
            (b for a in typing.get_args(tp) if a is not Ellipsis and (b := _first_bad(a, serializer))), None
        )
    if isinstance(tp, type) and issubclass(tp, _SCALARS[serializer]):
        return None
    return tp


def _name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp)
