"""`conduit queues`: depths from the counters, redrive the dead, purge what has not started,
pause and resume delivery."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from conduit.commands.common import JSON, db_options, emit, iso, open_store
from conduit.errors import ConduitError
from conduit.task import STATES, check_queue_name


@click.group(invoke_without_command=True)
@db_options
@JSON
@click.pass_context
def queues(
    ctx: click.Context, dsn: str | None, data_dir: Path | None, schema: str | None, as_json: bool
) -> None:
    """Per queue, tasks by state, from the counters (cheap on any backlog), and whether it is
    paused; with a subcommand, redrive, purge, pause or resume one queue. WAITING is pending plus
    held by brokers, not yet started."""
    if ctx.invoked_subcommand is not None:
        return
    with open_store(dsn, data_dir, schema) as store:
        stats = store.queue_stats()
        paused = store.paused()
    if as_json:
        emit(
            {
                "queues": {q: {s: counts.get(s, 0) for s in STATES} for q, counts in stats.items()},
                "paused": {q: iso(at) for q, at in paused.items()},
            }
        )
        return
    columns = ("running", "completed", "dead", "cancelled")
    click.echo(f"{'queue':<24}{'waiting':>10}" + "".join(f"{c:>11}" for c in columns) + "  paused")
    for queue in sorted(stats.keys() | paused.keys()):
        counts = stats.get(queue, {})
        waiting = counts.get("pending", 0) + counts.get("buffered", 0)
        line = f"{queue:<24}{waiting:>10}" + "".join(f"{counts.get(c, 0):>11}" for c in columns)
        click.echo(line + ("  yes" if queue in paused else ""))


def _queue(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        check_queue_name(value)
    except ConduitError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@queues.command()
@db_options
@click.argument("queue", callback=_queue)
@JSON
def redrive(dsn: str | None, data_dir: Path | None, schema: str | None, queue: str, as_json: bool) -> None:
    """Put every dead task of QUEUE back to pending, failures forgiven."""
    with open_store(dsn, data_dir, schema) as store:
        done = store.redrive_all(queue)
    if as_json:
        emit({"queue": queue, "redriven": done})
    else:
        click.echo(f"{done} dead tasks of {queue} back to pending")


@queues.command()
@db_options
@click.argument("queue", callback=_queue)
@click.option("--yes", is_flag=True, help="Do not ask first.")
@JSON
def purge(
    dsn: str | None, data_dir: Path | None, schema: str | None, queue: str, yes: bool, as_json: bool
) -> None:
    """Cancel every task of QUEUE that has not started: pending, and held by brokers (buffered,
    or delivered with no heartbeat yet). Running tasks are left to finish. Purged tasks are kept
    as cancelled, so `conduit tasks retry` can bring one back. Asks first unless --yes; exits 1
    when the answer is no."""
    with open_store(dsn, data_dir, schema) as store:
        counts = store.queue_stats().get(queue, {})
        waiting = counts.get("pending", 0) + counts.get("buffered", 0)
        if not yes:
            question = f"Cancel the {waiting} tasks of {queue} that have not started?"
            try:
                agreed = click.confirm(question, err=True)
            except click.Abort:
                agreed = False
            if not agreed:
                click.echo("nothing purged", err=True)
                sys.exit(1)
        done = store.purge(queue)
    if as_json:
        emit({"queue": queue, "purged": done})
    else:
        click.echo(f"{done} tasks of {queue} cancelled")


@queues.command()
@db_options
@click.argument("queue", callback=_queue)
@JSON
def pause(dsn: str | None, data_dir: Path | None, schema: str | None, queue: str, as_json: bool) -> None:
    """Stop delivering QUEUE, on every broker within about a second, until it is resumed.
    Submits are still taken and kept; tasks already delivered run to their end. Pausing a
    paused queue changes nothing (and exits 0)."""
    with open_store(dsn, data_dir, schema) as store:
        changed = store.pause(queue)
    _report(queue, True, changed, as_json)


@queues.command()
@db_options
@click.argument("queue", callback=_queue)
@JSON
def resume(dsn: str | None, data_dir: Path | None, schema: str | None, queue: str, as_json: bool) -> None:
    """Deliver a paused QUEUE again: brokers read its backlog at once."""
    with open_store(dsn, data_dir, schema) as store:
        changed = store.resume(queue)
    _report(queue, False, changed, as_json)


def _report(queue: str, paused: bool, changed: bool, as_json: bool) -> None:
    if as_json:
        emit({"queue": queue, "paused": paused, "changed": changed})
    elif changed:
        click.echo(f"{queue} {'paused' if paused else 'resumed'}")
    else:
        click.echo(f"{queue} {'was paused already' if paused else 'was not paused'}")
