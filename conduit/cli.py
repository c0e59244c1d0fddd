"""The `conduit` command. Errors go to stderr as one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from conduit.commands import dashboard, dburl, keys, queues, status, submit, tasks, top, workers
from conduit.commands.common import METRICS, Endpoint, db_options
from conduit.config import Settings
from conduit.endpoints import check_advertise
from conduit.errors import ConduitError
from conduit.store import Store, describe_dsn, dsn_for, init_schema
from conduit.store.embedded import embedded_for, stop_server
from conduit.store.queries import SCHEMA_VERSION
from conduit.task import Completion, TaskSpec


class _Cli(click.Group):
    """Every error is one line on stderr and a non-zero exit: Conduit's own errors (1), and usage
    errors (2) too, without click's usage banner and hint lines."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConduitError as exc:
            raise click.ClickException(str(exc)) from None

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"Error: {exc.format_message().rstrip('.')}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Error: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Cli)
@click.version_option(package_name="conduit")
def main() -> None:
    """Conduit: durable distributed task queues on PostgreSQL and ZeroMQ."""


@main.group()
def db() -> None:
    """Set up and check the database."""


db.add_command(dburl.url)
main.add_command(tasks.tasks)
main.add_command(queues.queues)
main.add_command(workers.workers)
main.add_command(submit.submit)
main.add_command(status.status)
main.add_command(keys.keys)
main.add_command(top.top)
main.add_command(dashboard.dashboard)


_RETENTION = click.option(
    "--retention-days",
    type=click.FloatRange(min=1),
    help="Keep finished tasks (and idempotency and submit keys) this many days (default 7).",
)


@db.command("init")
@db_options
@_RETENTION
def db_init(dsn: str | None, data_dir: Path | None, schema: str | None, retention_days: float | None) -> None:
    """Create Conduit's schema, or migrate an older one (idempotent)."""
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    url = dsn_for(settings)
    done = init_schema(url, settings.schema)
    state = {"migrated": f"migrated to version {SCHEMA_VERSION}", "current": "already up to date"}.get(
        done, done
    )
    click.echo(f"schema {settings.schema!r} {state} on {describe_dsn(url)}")
    if retention_days is not None:
        with Store.open(url, schema=settings.schema) as store:
            store.set_retention(retention_days)
        click.echo(f"finished tasks are kept {retention_days:g} days")


@db.command("prune")
@db_options
@_RETENTION
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def db_prune(
    dsn: str | None, data_dir: Path | None, schema: str | None, retention_days: float | None, as_json: bool
) -> None:
    """Drop the days of finished tasks older than the retention, and expired keys.

    Brokers do this by themselves every hour; this does it now. History is kept in one partition
    a day (UTC) and dropped a whole day at a time, never row by row. --retention-days prunes with
    that retention this once, without changing the one the database keeps."""
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    with Store.open(dsn_for(settings), schema=settings.schema) as store:
        days = store.retention() if retention_days is None else retention_days
        dropped = store.prune(days)
        made = store.ensure_partitions()
    if as_json:
        click.echo(
            json.dumps({"retention_days": days, "partitions_dropped": dropped, "partitions_made": made})
        )
    else:
        click.echo(f"kept {days:g} days of finished tasks: dropped {dropped} partitions (two a day)")


@db.command("check")
@db_options
def db_check(dsn: str | None, data_dir: Path | None, schema: str | None) -> None:
    """Push one task through the store and back: enqueue, lease, complete, read the result."""
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    with Store.open(dsn_for(settings), schema=settings.schema) as store:
        store.ensure_partitions()  # the check completes a task: today's history must exist
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
        store.drop_broker(owner)
        if info.state != "completed" or info.result != b"pong" or stale[0] == "ok":
            raise ConduitError(f"store check failed: task ended {info.state} with {info.result!r}")
        click.echo(
            f"store ok: task {submitted.id} enqueued, leased, completed once "
            f"in {(time.perf_counter() - began) * 1000:.1f} ms"
        )


@db.command("stop")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded server's folder.")
@click.option("--force", is_flag=True, help="Stop it even while sessions are connected (they are cut off).")
def db_stop(data_dir: Path | None, force: bool) -> None:
    """Stop the embedded PostgreSQL server (its data stays).

    Refuses, with a non-zero exit, while sessions are connected to it: one server serves every
    process that uses its folder, so stopping it would break someone else's broker. --force stops
    it anyway; a broker started on that folder without --dsn starts it again when it reconnects."""
    settings = Settings.load(data_dir=data_dir)
    if stop_server(settings.data_dir, force=force):
        click.echo(f"stopped the embedded server in {settings.data_dir}")
    else:
        click.echo(f"no embedded server running in {settings.data_dir}")


@main.command()
@db_options
@click.option(
    "--bind",
    default="tcp://127.0.0.1:5555",
    show_default=True,
    type=Endpoint(bind=True),
    help="ROUTER endpoint ('*' port: any).",
)
@click.option(
    "--pub",
    type=Endpoint(bind=True),
    help="PUB endpoint for gossip (queue depths), e.g. tcp://127.0.0.1:5556 ('*' port: any).",
)
@click.option(
    "--advertise",
    type=Endpoint(),
    help="The ROUTER endpoint peers reach this broker by, e.g. tcp://10.0.0.5:5555 "
    "(required when --bind is tcp://*:PORT or tcp://0.0.0.0:PORT).",
)
@click.option(
    "--advertise-pub",
    type=Endpoint(),
    help="The gossip endpoint peers reach this broker by (required for a wildcard --pub).",
)
@click.option("--broker-id", help="Unique id of this broker (default: random).")
@click.option("--buffer-size", default=1000, show_default=True, help="Tasks buffered per queue at most.")
@click.option("--lease-batch", default=500, show_default=True, help="Tasks read from PostgreSQL at a time.")
@click.option("--lease-term", default=10.0, show_default=True, help="Broker lease term, seconds.")
@click.option(
    "--curve-secret",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The mesh's broker keypair, NAME.key_secret (env CONDUIT_CURVE_SECRET): CURVE on.",
)
@click.option(
    "--curve-allow",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of allowed client public keys, *.key (env CONDUIT_CURVE_ALLOW), re-read every second.",
)
@METRICS
@click.option("--log-level", default="info", show_default=True)
def broker(
    dsn: str | None,
    data_dir: Path | None,
    schema: str | None,
    bind: str,
    pub: str | None,
    advertise: str | None,
    advertise_pub: str | None,
    broker_id: str | None,
    buffer_size: int,
    lease_batch: int,
    lease_term: float,
    curve_secret: Path | None,
    curve_allow: Path | None,
    metrics_address: tuple[str, int] | None,
    log_level: str,
) -> None:
    """Run a broker (task service). Prints its endpoint, then its gossip endpoint if any, on
    stdout (as advertised: peers connect to these); logs go to stderr (with --metrics, where it
    serves them). With --curve-secret and --curve-allow, only clients whose public key is in the
    folder get in, and everything on the wire is encrypted (README, Security)."""
    import zmq

    from conduit import logs
    from conduit.broker.core import Config
    from conduit.broker.metrics import BrokerMetrics
    from conduit.broker.service import Broker
    from conduit.curve import ServerCurve

    if advertise_pub and not pub:
        raise click.UsageError("--advertise-pub names a gossip endpoint: give --pub too")
    try:  # before the database: a usage error costs nothing
        check_advertise(bind, advertise)
        if pub:
            check_advertise(pub, advertise_pub, "--advertise-pub")
    except ConduitError as exc:
        raise click.UsageError(str(exc)) from None
    logs.setup(log_level)
    curve = ServerCurve.load(curve_secret, curve_allow)
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    config = Config(
        broker_id=broker_id or f"broker-{uuid.uuid4().hex[:8]}",
        buffer_size=buffer_size,
        lease_batch=lease_batch,
        lease_term=lease_term,
        max_payload_bytes=settings.max_payload_bytes,
    )
    url, ensure_database = settings.dsn, None
    if not url:  # the embedded server, which the broker starts again if it vanishes
        server = embedded_for(settings)
        url, ensure_database = server.dsn, server.ensure_running
    metrics = BrokerMetrics() if metrics_address else None
    with _serving(metrics_address, metrics, "conduit.broker"):
        try:
            service = Broker(
                config,
                url,
                settings.schema,
                bind,
                pub,
                advertise=advertise,
                advertise_pub=advertise_pub,
                ensure_database=ensure_database,
                curve=curve,
                metrics=metrics,
            )
        except zmq.ZMQError as exc:
            raise ConduitError(f"cannot bind {bind}: {exc}") from None
        click.echo(service.endpoint)
        if service.config.pub_endpoint:
            click.echo(service.config.pub_endpoint)
        sys.stdout.flush()
        service.run()


@contextlib.contextmanager
def _serving(address: tuple[str, int] | None, collector: Any, logger_name: str) -> Iterator[None]:
    """Serve /metrics for the body's duration, if an address is given: bound before anything
    else starts, so a port in use is a one-line error at once."""
    if address is None or collector is None:
        yield
        return
    import logging

    from conduit.logs import log
    from conduit.metrics import MetricsServer

    server = MetricsServer(address, collector)
    log(logging.getLogger(logger_name), "info", "metrics_serving", url=server.url)
    try:
        yield
    finally:
        server.close()


@main.command()
@click.argument("target")
@click.option(
    "--connect",
    "endpoints",
    multiple=True,
    type=Endpoint(),
    help="Broker endpoint(s), overriding the Worker's.",
)
@click.option("--concurrency", type=int, help="Handlers running at once, overriding the Worker's.")
@click.option("--prefetch", type=int, help="Tasks held beyond the running ones, overriding the Worker's.")
@keys.client_options
@METRICS
@click.option("--log-level", default="info", show_default=True)
def worker(
    target: str,
    endpoints: tuple[str, ...],
    concurrency: int | None,
    prefetch: int | None,
    curve_secret: Path | None,
    curve_server: Path | None,
    metrics_address: tuple[str, int] | None,
    log_level: str,
) -> None:
    """Run the conduit.client.Worker named by TARGET, as module:attribute (attribute: worker).

    The current directory is on the import path. SIGINT or SIGTERM stops it once the running
    tasks finish; a second one stops it at once (exit 130), and what it held runs again."""
    from conduit import logs
    from conduit.client import WorkerAborted
    from conduit.client.launch import load
    from conduit.curve import ClientCurve

    logs.setup(log_level)
    curve = ClientCurve.load(curve_secret, curve_server) if curve_secret or curve_server else None
    obj = load(target)
    if curve:
        obj.curve = curve
    if endpoints:
        obj.endpoints = list(endpoints)
    if concurrency:
        obj.concurrency = concurrency
    if prefetch is not None:
        obj.prefetch = prefetch
    try:
        with _serving(metrics_address, obj.metrics, "conduit.worker"):
            obj.run()
    except WorkerAborted as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.stderr.flush()
        os._exit(130)  # handler threads may still run: do not wait for them


@main.command()
@db_options
@click.option(
    "--tasks", default=20_000, show_default=True, type=click.IntRange(min=1), help="Tasks in the burst."
)
@click.option(
    "--batch", default=500, show_default=True, type=click.IntRange(1, 10_000), help="Tasks per submit."
)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="Worker processes.")
@click.option(
    "--producers",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Threads submitting the burst.",
)
@click.option(
    "--single",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="One-at-a-time tasks for sync-match latency.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def demo(
    dsn: str | None,
    data_dir: Path | None,
    schema: str | None,
    tasks: int,
    batch: int,
    workers: int,
    producers: int,
    single: int,
    as_json: bool,
) -> None:
    """Start a broker and workers, push tasks through, print throughput and latency, stop."""
    from conduit import demo as run
    from conduit.client import Client

    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    url = dsn_for(settings)
    init_schema(url, settings.schema)
    click.echo(f"database: {describe_dsn(url)}, schema {settings.schema}", err=True)
    cluster = run.Cluster(url, settings.schema, workers)
    try:
        click.echo(f"broker at {cluster.endpoint}, {workers} worker processes", err=True)
        with (
            Client(cluster.endpoint) as client,
            Store.open(url, schema=settings.schema) as store,
        ):
            figures = {
                "burst": run.burst(client, store, tasks, batch, producers),
                "sync_match": run.sync_match(client, store, single),
            }
    finally:
        cluster.close()
    rows = run.report(figures)
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'':<30}{'submit->start ms':^24}{'submit->done ms':^24}")
    click.echo(f"{'scenario':<12}{'tasks':>8}{'tasks/s':>10}" + f"{'p50':>12}{'p99':>12}" * 2)
    for name, row in rows.items():
        s, c = row["start_latency_ms"], row["complete_latency_ms"]
        latencies = "".join(f"{d[k]:>12.2f}" for d in (s, c) for k in ("p50", "p99"))
        click.echo(f"{name:<12}{row['tasks']:>8}{row['tasks_per_s']:>10,.0f}{latencies}")
