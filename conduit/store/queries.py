"""Loads queries.sql into a name -> statement table, so SQL stays in one file and code names it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load(text: str) -> dict[str, str]:
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


QUERIES = load(resources.files("conduit.store").joinpath("queries.sql").read_text())
SCHEMA = resources.files("conduit.store").joinpath("schema.sql").read_text()
SCHEMA_VERSION = 7


def int_array(values: Iterable[int]) -> str:
    """An array literal of integers, for a `%(name)s::bigint[]` parameter: one join, where psycopg
    would dump a list element by element in Python (see queries.sql)."""
    return "{" + ",".join(map(str, values)) + "}"
