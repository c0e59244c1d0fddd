"""What the subcommands share: database options, durations, endpoints, JSON and table output."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from conduit.config import Settings
from conduit.endpoints import check_endpoint, split_endpoints
from conduit.errors import ConduitError
from conduit.store import Store, dsn_for


def db_options(command: Any) -> Any:
    command = click.option(
        "--dsn", help="PostgreSQL DSN (env CONDUIT_DSN); without one, the embedded server is used."
    )(command)
    command = click.option(
        "--data-dir",
        type=click.Path(path_type=Path),
        help="Embedded server's folder (env CONDUIT_DATA_DIR).",
    )(command)
    return click.option(
        "--schema", help="Schema for Conduit's tables (env CONDUIT_SCHEMA; default conduit)."
    )(command)


JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@contextmanager
def open_store(dsn: str | None, data_dir: Path | None, schema: str | None) -> Iterator[Store]:
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    with Store.open(dsn_for(settings), schema=settings.schema) as store:
        yield store


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class Duration(click.ParamType):
    """Seconds, or a number with s, m, h or d: 90, 90s, 15m, 2h, 7d."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        match = _DURATION.match(str(value).strip())
        if match is None:
            self.fail(f"{value!r} is not a duration such as 90, 90s, 15m, 2h or 7d", param, ctx)
        return float(match[1]) * _UNITS[match[2]]


class Endpoint(click.ParamType):
    """A ZeroMQ endpoint, checked at once (see conduit.endpoints)."""

    name = "endpoint"

    def __init__(self, *, bind: bool = False) -> None:
        self.bind = bind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_endpoint(str(value), bind=self.bind)
        except ConduitError as exc:
            self.fail(str(exc), param, ctx)


class MetricsAddress(click.ParamType):
    """HOST:PORT to serve /metrics on, checked at once (conduit.metrics.parse_address)."""

    name = "host:port"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        from conduit.metrics import parse_address

        try:
            return parse_address(str(value))
        except ConduitError as exc:
            self.fail(str(exc), param, ctx)


METRICS = click.option(
    "--metrics",
    "metrics_address",
    type=MetricsAddress(),
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (docs/METRICS.md); port 0: any free one.",
)


class Endpoints(click.ParamType):
    """One endpoint or several separated by commas; the option may be repeated too."""

    name = "endpoint[,endpoint...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[str]:
        if isinstance(value, list):
            return value
        try:
            return split_endpoints([str(value)])
        except ConduitError as exc:
            self.fail(str(exc), param, ctx)


def connect_option(asked_for: str = "") -> Any:
    """`--connect`: the brokers to ask (repeated, or comma-separated); default the live ones."""
    return click.option(
        "--connect",
        "endpoints",
        multiple=True,
        type=Endpoints(),
        help=" ".join(
            ("Broker endpoint(s) to ask", asked_for, "(repeat the option, or separate with commas).")
        ).replace("  ", " ")
        + " Default: every live broker the database knows.",
    )


def flat(groups: Sequence[list[str]]) -> list[str]:
    return list(dict.fromkeys(e for group in groups for e in group))


def bytes_field(name: str, data: bytes | None) -> dict[str, Any]:
    """Bytes for JSON: `name` as text when they are UTF-8, else `name_base64`."""
    if data is None:
        return {name: None}
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_base64": base64.b64encode(data).decode()}


def shown(data: bytes | None, limit: int = 200) -> str:
    """Bytes for a person: text if UTF-8 (cut at `limit`), else their size and first bytes in hex."""
    if data is None:
        return "-"
    try:
        value = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(data)} bytes: {data[:16].hex()}{'...' if len(data) > 16 else ''}>"
    return value if len(value) <= limit else value[:limit] + "..."


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def emit(data: Any) -> None:
    click.echo(json.dumps(data, sort_keys=True))
