"""The `conduit` command. Errors go to stderr as one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import click

from conduit.config import Settings
from conduit.errors import ConduitError
from conduit.store import EmbeddedPostgres, Store, describe_dsn, dsn_for, init_schema
from conduit.task import Ack, Completion, TaskSpec


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConduitError as exc:
            raise click.ClickException(str(exc)) from None


def _db_options(command: Any) -> Any:
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


@click.group(cls=_Cli)
@click.version_option(package_name="conduit")
def main() -> None:
    """Conduit: durable distributed task queues on PostgreSQL and ZeroMQ."""


@main.group()
def db() -> None:
    """Set up and check the database."""


@db.command("init")
@_db_options
def db_init(dsn: str | None, data_dir: Path | None, schema: str | None) -> None:
    """Create Conduit's schema (idempotent)."""
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    url = dsn_for(settings)
    created = init_schema(url, settings.schema)
    state = "created" if created else "already up to date"
    click.echo(f"schema {settings.schema!r} {state} on {describe_dsn(url)}")


@db.command("check")
@_db_options
def db_check(dsn: str | None, data_dir: Path | None, schema: str | None) -> None:
    """Push one task through the store and back: enqueue, lease, complete, read the result."""
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    with Store.open(dsn_for(settings), schema=settings.schema) as store:
        began = time.perf_counter()
        owner = store.acquire_broker(f"check-{uuid.uuid4().hex[:8]}", "check", term=30)
        key = uuid.uuid4().hex
        spec = TaskSpec("conduit.check", b"ping", idempotency_key=key)
        (submitted,) = store.enqueue([spec])
        again = store.enqueue([spec])[0]
        leased = store.lease(owner, "conduit.check", 1)
        if [t.id for t in leased] != [submitted.id] or again.id != submitted.id or again.created:
            raise ConduitError("store check failed: the task was not leased back as submitted")
        store.complete([Completion(submitted.id, leased[0].attempt, b"pong")])
        stale = store.complete([Completion(submitted.id, leased[0].attempt, b"again")])
        info = store.lookup([submitted.id])[0]
        store.release([Ack(submitted.id, leased[0].attempt)])
        store.drop_broker(owner)
        if info.state != "completed" or info.result != b"pong" or stale[0] == "ok":
            raise ConduitError(f"store check failed: task ended {info.state} with {info.result!r}")
        click.echo(
            f"store ok: task {submitted.id} enqueued, leased, completed once "
            f"in {(time.perf_counter() - began) * 1000:.1f} ms"
        )


@db.command("stop")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded server's folder.")
def db_stop(data_dir: Path | None) -> None:
    """Stop the embedded PostgreSQL server (its data stays)."""
    settings = Settings.load(data_dir=data_dir)
    if not (settings.data_dir / "postmaster.pid").exists():
        click.echo(f"no embedded server running in {settings.data_dir}")
        return
    EmbeddedPostgres(settings.data_dir).stop()
    click.echo(f"stopped the embedded server in {settings.data_dir}")


@main.command()
@_db_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(dsn: str | None, data_dir: Path | None, schema: str | None, as_json: bool) -> None:
    """Per-queue task counts by state, from counters (cheap on any backlog)."""
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    with Store.open(dsn_for(settings), schema=settings.schema) as store:
        stats = store.queue_stats()
    if as_json:
        click.echo(json.dumps({"queues": stats}, sort_keys=True))
        return
    states = ["pending", "buffered", "running", "completed", "dead", "cancelled"]
    click.echo(f"{'queue':<24}" + "".join(f"{s:>11}" for s in states))
    for queue, counts in sorted(stats.items()):
        click.echo(f"{queue:<24}" + "".join(f"{counts.get(s, 0):>11}" for s in states))
