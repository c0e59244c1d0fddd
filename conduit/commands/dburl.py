"""`conduit db url`: the DSN in use, and a psql command line that reaches it as it is."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from conduit.commands.common import JSON, db_options, emit
from conduit.config import Settings
from conduit.store import describe_dsn, dsn_for


@click.command("url")
@db_options
@JSON
def url(dsn: str | None, data_dir: Path | None, schema: str | None, as_json: bool) -> None:
    """Print the DSN (the embedded server's, started if need be, when none is set), then a psql
    command line for it with Conduit's schema on the search path. The embedded server listens on
    a Unix socket in its folder and its user is postgres, which the DSN names (plain
    `psql -h FOLDER` would log in as you and be refused)."""
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    found = dsn_for(settings)
    psql = f"PGOPTIONS={shlex.quote(f'-c search_path={settings.schema}')} psql {shlex.quote(found)}"
    if as_json:
        emit(
            {
                "dsn": found,
                "psql": psql,
                "schema": settings.schema,
                "embedded": not settings.dsn,
                "server": describe_dsn(found),
            }
        )
    else:
        click.echo(found)
        click.echo(psql)
