"""`conduit tasks`: list, show, cancel and retry tasks, straight on the database.

The CLI goes through the Store rather than a broker: these are database reads and writes that
matching plays no part in, so they work with no broker running, and a long listing never sits in
a broker's reader thread ahead of its leases. Cancel keeps the broker's rules as it is: a task
a broker holds in memory is fenced (its delivery's reports are refused as `cancelled`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from conduit.commands.common import (
    JSON,
    Duration,
    bytes_field,
    db_options,
    emit,
    iso,
    open_store,
    shown,
    when,
)
from conduit.task import STATES, Outcome, TaskDetail, TaskRow

_IDS = click.argument("ids", nargs=-1, required=True, type=click.IntRange(min=0, max=2**63 - 1))


@click.group()
def tasks() -> None:
    """List, show, cancel and retry tasks (on the database; no broker needed)."""


@tasks.command("list")
@db_options
@click.option("--queue", help="Only this queue.")
@click.option(
    "--state",
    type=click.Choice(STATES),
    help="Only this state. Default: every live task, by id. pending: in the order they run; "
    "completed, dead, cancelled: newest first.",
)
@click.option(
    "--older-than", type=Duration(), help="Due (live) or finished at least this long ago: 90s, 15m, 2h, 7d."
)
@click.option("--newer-than", type=Duration(), help="Due (live) or finished at most this long ago.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000), help="Tasks a page.")
@click.option("--after", metavar="CURSOR", help="The next page: the cursor the previous page printed.")
@JSON
def list_tasks(
    dsn: str | None,
    data_dir: Path | None,
    schema: str | None,
    queue: str | None,
    state: str | None,
    older_than: float | None,
    newer_than: float | None,
    limit: int,
    after: str | None,
    as_json: bool,
) -> None:
    """A page of tasks, read from an index by keyset (never a count). SINCE is when a live task
    came due, or when a finished one ended. When there is more, the cursor of the next page is
    printed on stderr (in --json, as "next")."""
    with open_store(dsn, data_dir, schema) as store:
        page = store.list_tasks(
            queue=queue, state=state, older_than=older_than, newer_than=newer_than, limit=limit, after=after
        )
    if as_json:
        emit({"tasks": [_row(r) for r in page.rows], "next": page.next})
        return
    click.echo(
        f"{'id':>12}  {'queue':<24}{'state':<10}{'attempt':>8}{'failures':>9}  {'since':<21}broker or error"
    )
    for r in page.rows:
        extra = r.broker or shown(r.error.encode() if r.error else None, 60)
        click.echo(
            f"{r.id:>12}  {r.queue:<24}{r.state:<10}{r.attempt:>8}{r.failures:>9}  {when(r.since):<21}{extra}"
        )
    if page.next:
        click.echo(f"more: --after {page.next}", err=True)


def _row(r: TaskRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "queue": r.queue,
        "state": r.state,
        "priority": r.priority,
        "attempt": r.attempt,
        "failures": r.failures,
        "since": iso(r.since),
        "broker": r.broker,
        "error": r.error,
    }


@tasks.command("show")
@db_options
@_IDS
@JSON
def show(
    dsn: str | None, data_dir: Path | None, schema: str | None, ids: tuple[int, ...], as_json: bool
) -> None:
    """Everything kept about tasks: state, policy, payload, result, error. Exits 1 if any ID is
    unknown (never submitted, or pruned)."""
    with open_store(dsn, data_dir, schema) as store:
        found = store.show(ids)
    if as_json:
        emit({"tasks": [_detail(d) for d in found]})
    else:
        for n, d in enumerate(found):
            if n:
                click.echo()
            for key, value in _detail(d).items():
                click.echo(f"{key + ':':<18}{'-' if value is None else value}")
    missing = [i for i in ids if i not in {d.id for d in found}]
    if missing:
        raise click.ClickException(f"no task {', '.join(map(str, missing))} (never submitted, or pruned)")


def _detail(d: TaskDetail) -> dict[str, Any]:
    return {
        "id": d.id,
        "queue": d.queue,
        "state": d.state,
        "priority": d.priority,
        "attempt": d.attempt,
        "failures": d.failures,
        "max_attempts": d.max_attempts,
        "lease_timeout": d.lease_timeout,
        "backoff_base": d.backoff_base,
        "backoff_max": d.backoff_max,
        "run_at": iso(d.run_at),
        "lease_expires_at": iso(d.lease_expires_at),
        "broker": d.broker,
        "idempotency_key": d.idempotency_key,
        **bytes_field("payload", d.payload),
        **bytes_field("result", d.result),
        "error": d.error,
        "finished_at": iso(d.finished_at),
    }


@tasks.command("cancel")
@db_options
@_IDS
@JSON
def cancel(
    dsn: str | None, data_dir: Path | None, schema: str | None, ids: tuple[int, ...], as_json: bool
) -> None:
    """Cancel tasks, whatever their live state. A running one's handler is not stopped here: its
    heartbeats and its result are refused as `cancelled`. Exits 1 if any was not cancelled
    (finished, cancelled already, unknown)."""
    with open_store(dsn, data_dir, schema) as store:
        outcomes = store.cancel(ids)
    _report(ids, outcomes, "cancelled", as_json)


@tasks.command("retry")
@db_options
@_IDS
@JSON
def retry(
    dsn: str | None, data_dir: Path | None, schema: str | None, ids: tuple[int, ...], as_json: bool
) -> None:
    """Put dead or cancelled tasks back to pending, failures forgiven (the attempt keeps
    growing, so an old delivery stays fenced off). Exits 1 if any was not retried (live: it has
    not ended; finished: it completed; unknown)."""
    with open_store(dsn, data_dir, schema) as store:
        outcomes = store.retry(ids)
    _report(ids, outcomes, "retried", as_json)


def _report(ids: tuple[int, ...], outcomes: list[Outcome], done: str, as_json: bool) -> None:
    if as_json:
        emit({"outcomes": {str(i): str(o) for i, o in zip(ids, outcomes, strict=True)}})
    else:
        for i, o in zip(ids, outcomes, strict=True):
            click.echo(f"{i} {done}" if o is Outcome.OK else f"{i} not {done}: {o}")
    if any(o is not Outcome.OK for o in outcomes):
        sys.exit(1)
