"""`conduit top`: queues, brokers and workers, redrawn every second (`conduit.observe` reads them)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from conduit.commands.common import JSON, connect_option, db_options, emit, flat
from conduit.config import Settings
from conduit.errors import ConduitError
from conduit.observe import Frame, Observer
from conduit.store import Store, dsn_for
from conduit.task import STATES

INTERVAL = 1.0


@click.command()
@db_options
@connect_option(" for workers and buffers")
@click.option("--once", is_flag=True, help="Print one frame and exit (plain text when not a terminal).")
@JSON
def top(
    dsn: str | None,
    data_dir: Path | None,
    schema: str | None,
    endpoints: tuple[list[str], ...],
    once: bool,
    as_json: bool,
) -> None:
    """A live view, redrawn every second: queues (tasks by state from the counters, rates in and
    out, start latency), brokers (epoch and lease from the database, buffered tasks and waiting
    polls from their gossip, when they publish it) and the workers the live brokers heard.
    Ctrl-C leaves."""
    if as_json and not once:
        raise click.UsageError("--json needs --once")
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    url = dsn_for(settings)
    Store.open(url, schema=settings.schema).close()  # a bad DSN or schema: one line, at once
    observer = Observer(url, settings.schema, flat(endpoints))
    try:
        if once:
            observer.queues()  # a first reading, for rates; the brokers' gossip is heard meanwhile
            observer.mesh()
            time.sleep(INTERVAL)
            frame = observer.frame()
            if as_json:
                emit(frame.as_json())
            else:
                _console().print(render(frame, live=False))
            return
        _live(observer)
    finally:
        observer.close()


def _console() -> Console:
    tty = sys.stdout.isatty()
    return Console(highlight=False, no_color=not tty, width=None if tty else 160)


def _live(observer: Observer) -> None:
    console = _console()
    if not console.is_terminal:  # piped: a frame a second, one after the other
        try:
            while True:
                console.print(_safe_render(observer))
                time.sleep(INTERVAL)
        except KeyboardInterrupt:
            return
    try:
        with Live(_safe_render(observer), console=console, screen=True, auto_refresh=False) as live:
            while True:
                time.sleep(INTERVAL)
                live.update(_safe_render(observer), refresh=True)
    except KeyboardInterrupt:
        return


def _safe_render(observer: Observer) -> RenderableType:
    """A frame, or the error that kept it from being read (the next second tries again)."""
    try:
        return render(observer.frame())
    except ConduitError as exc:
        return Text(f"conduit top: {exc} (retrying every second; Ctrl-C leaves)", style="bold red")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.1f}"


def render(frame: Frame, live: bool = True) -> RenderableType:
    style = box.SIMPLE_HEAD if sys.stdout.isatty() else box.ASCII2
    queues = Table(title="queues", title_justify="left", box=style, padding=(0, 1))
    queues.add_column("queue", no_wrap=True)
    for state in STATES:
        queues.add_column(state, justify="right")
    for label in ("in/s", "out/s", "start p50 ms", "p99 ms"):
        queues.add_column(label, justify="right")
    for q in frame.queues:
        name = f"{q.name} (paused)" if q.paused else q.name
        queues.add_row(
            name,
            *(f"{q.counts.get(s, 0):,}" for s in STATES),
            _rate(q.rate_in),
            _rate(q.rate_out),
            _ms(q.latency.p50 if q.latency else None),
            _ms(q.latency.p99 if q.latency else None),
        )
    brokers = Table(title="brokers", title_justify="left", box=style, padding=(0, 1))
    for label in ("broker", "epoch", "endpoint", "lease", "buffered", "polls by queue"):
        brokers.add_column(label, justify="right" if label in ("epoch", "buffered") else "left")
    for b in frame.brokers:
        left = b.row.lease_left
        lease = f"live, {left:.1f}s left" if b.row.live else f"expired {-left:.1f}s ago"
        brokers.add_row(
            b.row.broker,
            str(b.row.epoch),
            b.row.endpoint,
            lease,
            "-" if b.buffered is None else f"{b.buffered:,}",
            "-" if b.gossip is None else " ".join(f"{q}:{c[1]}" for q, c in sorted(b.gossip.items())) or "0",
        )
    workers = Table(title="workers", title_justify="left", box=style, padding=(0, 1))
    numbers = ("polls", "holding", "running", "prefetched", "heard")
    for label in ("worker", "broker", "queues", *numbers):
        workers.add_column(label, justify="right" if label in numbers else "left")
    for w in sorted(frame.workers, key=lambda w: (w.worker or "", w.broker)):
        workers.add_row(
            w.worker or f"(peer {w.peer[:8]})",
            w.broker,
            ",".join(w.queues) or "-",
            str(w.polls),
            f"{w.holding:,}",
            "-" if w.running is None else f"{w.running:,}",
            "-" if w.prefetched is None else f"{w.prefetched:,}",
            f"{w.heard:.1f}s ago",
        )
    header = Text(f"conduit top  {frame.taken_at:%Y-%m-%d %H:%M:%S} UTC", style="bold")
    if live:
        header.append("  (Ctrl-C leaves)", style="dim")
    parts: list[RenderableType] = [header, queues, brokers, workers]
    parts += [Text(problem, style="yellow") for problem in frame.problems]
    return Group(*parts)
