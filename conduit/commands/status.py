"""`conduit status`: per-queue counts from the counters, and the mesh as its gossip tells it."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from conduit.commands import keys
from conduit.commands.common import Endpoints, db_options, flat
from conduit.config import Settings
from conduit.store import Store, dsn_for

if TYPE_CHECKING:
    from conduit.curve import ClientCurve


@click.command()
@db_options
@click.option(
    "--gossip",
    "gossip_groups",
    multiple=True,
    type=Endpoints(),
    help="Gossip endpoint of a broker (tcp://HOST:PORT), to show the mesh too; repeat the option "
    "or separate endpoints with commas. Default: asked of the live brokers.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@keys.client_options
def status(
    dsn: str | None,
    data_dir: Path | None,
    schema: str | None,
    gossip_groups: tuple[list[str], ...],
    as_json: bool,
    curve_secret: Path | None,
    curve_server: Path | None,
) -> None:
    """Per-queue task counts by state, from counters (cheap on any backlog), and with --gossip
    the live brokers with their buffered tasks and waiting polls per queue.

    A task a broker handed to a worker stays `buffered` in the database until the worker's first
    heartbeat; the live brokers' gossip says how many, and they are counted as running."""
    from conduit.curve import ClientCurve

    gossip = flat(gossip_groups)
    curve = ClientCurve.load(curve_secret, curve_server)
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    with Store.open(dsn_for(settings), schema=settings.schema) as store:
        stats = store.queue_stats()
        live = store.live_brokers()
    brokers = _listen_to_gossip(curve, gossip or _gossip_endpoints(curve, live), len(live))
    for queue, counts in stats.items():
        delivered = min(counts.get("buffered", 0), sum(b.delivered(queue) for b in brokers))
        if delivered:
            counts["buffered"] -= delivered
            counts["running"] = counts.get("running", 0) + delivered
    if as_json:
        mesh = {b.broker: {"endpoint": b.endpoint, "queues": b.queues} for b in brokers}
        click.echo(json.dumps({"queues": stats, "brokers": mesh}, sort_keys=True))
        return
    states = ["pending", "buffered", "running", "completed", "dead", "cancelled"]
    click.echo(f"{'queue':<24}" + "".join(f"{s:>11}" for s in states))
    for queue, counts in sorted(stats.items()):
        click.echo(f"{queue:<24}" + "".join(f"{counts.get(s, 0):>11}" for s in states))
    if gossip:
        click.echo(f"\n{'broker':<20}{'endpoint':<28}{'queue':<24}{'buffered':>10}{'polls':>8}")
        for b in sorted(brokers, key=lambda b: b.broker):
            for queue, counts in sorted(b.queues.items()) or [("-", [0, 0])]:
                click.echo(f"{b.broker:<20}{b.endpoint:<28}{queue:<24}{counts[0]:>10}{counts[1]:>8}")


def _gossip_endpoints(curve: ClientCurve | None, brokers: list[str], seconds: float = 0.5) -> list[str]:
    """Ask every live broker at once where it gossips (PING's `pub`); one that does not answer
    within `seconds` is left out."""
    import zmq

    from conduit.client.link import dealer
    from conduit.curve import client_context
    from conduit.wire import REPLIES, Command, ProtocolError, decode, encode

    ctx = client_context(curve)
    socks = [dealer(ctx, endpoint) for endpoint in brokers]
    poller = zmq.Poller()
    found: list[str] = []
    for sock in socks:
        poller.register(sock, zmq.POLLOUT)  # writable once connected (IMMEDIATE)
    try:
        deadline = time.monotonic() + seconds
        while poller.sockets and (left := deadline - time.monotonic()) > 0:
            for sock, event in poller.poll(round(left * 1000)):
                if event & zmq.POLLOUT:
                    sock.send_multipart(encode(Command.PING, {"rid": 1}), zmq.NOBLOCK)
                    poller.modify(sock, zmq.POLLIN)
                    continue
                poller.unregister(sock)
                with contextlib.suppress(ProtocolError):
                    found.append(str(decode(sock.recv_multipart(), allowed=REPLIES).body.get("pub") or ""))
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
    return [pub for pub in found if pub]


def _listen_to_gossip(
    curve: ClientCurve | None, endpoints: list[str], expect: int = 0, seconds: float = 1.5
) -> list[Any]:
    """Brokers heard within a few gossip intervals (slow joiners hear the next round); done as
    soon as `expect` brokers are heard."""
    from conduit.client.mesh import Mesh
    from conduit.curve import client_context

    if not endpoints:
        return []
    ctx = client_context(curve)
    mesh = Mesh(ctx, [], endpoints)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (expect and len(mesh.brokers) >= expect):
            mesh.sub.poll(100)
            mesh.update()
        return mesh.live()
    finally:
        mesh.close()
        ctx.term()
