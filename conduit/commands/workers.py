"""`conduit workers`: who polls which broker, holding what, last heard, as brokers tell it."""

from __future__ import annotations

from pathlib import Path

import click

from conduit.commands import keys
from conduit.commands.common import JSON, connect_option, db_options, emit, flat, open_store
from conduit.errors import ConduitError


@click.command()
@db_options
@connect_option()
@keys.client_options
@JSON
def workers(
    dsn: str | None,
    data_dir: Path | None,
    schema: str | None,
    endpoints: tuple[list[str], ...],
    curve_secret: Path | None,
    curve_server: Path | None,
    as_json: bool,
) -> None:
    """The workers each broker heard in the last minute: the queues of their last poll, polls
    waiting, tasks held through that broker (delivered there, or heartbeated there), their
    concurrency, seconds since it last heard them, and their host and pid (as their polls tell;
    '-' where they do not). A worker on several brokers shows once for each."""
    from conduit.client import Client
    from conduit.curve import ClientCurve

    curve = ClientCurve.load(curve_secret, curve_server)
    asked = flat(endpoints)
    if not asked:
        with open_store(dsn, data_dir, schema) as store:
            asked = store.live_brokers()
    if not asked:
        raise ConduitError("no live broker in the database: start one, or name brokers with --connect")
    with Client(asked, curve=curve) as client:
        seen = client.workers()
    if as_json:
        emit({"workers": [w.as_dict() for w in seen]})
        return
    click.echo(
        f"{'worker':<28}{'broker':<20}{'queues':<28}{'polls':>6}{'holding':>9}{'running':>9}{'conc':>6}"
        f"{'heard':>8}"
        f"  {'host':<24}{'pid':>8}"
    )
    for w in sorted(seen, key=lambda w: (w.worker or "", w.broker)):
        name = w.worker or f"(peer {w.peer[:8]})"
        heard = f"{w.heard:.1f}s"
        queues = ",".join(w.queues) or "-"
        conc = "-" if w.concurrency is None else w.concurrency
        pid = "-" if w.pid is None else w.pid
        run = "-" if w.running is None else w.running
        click.echo(
            f"{name:<28}{w.broker:<20}{queues:<28}{w.polls:>6}{w.holding:>9}{run:>9}{conc:>6}{heard:>8}"
            f"  {w.host or '-':<24}{pid:>8}"
        )
