"""`conduit dashboard`: the web dashboard (conduit/dashboard/), served by uvicorn."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import click

from conduit.commands.common import connect_option, db_options, flat
from conduit.config import Settings
from conduit.errors import ConduitError
from conduit.store import Store, dsn_for

TOKEN_ENV = "CONDUIT_DASHBOARD_TOKEN"


def _bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT, such as 127.0.0.1:8080", param_hint="--bind")
    return host.strip("[]"), int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@db_options
@click.option("--bind", "bind", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to serve on.")
@connect_option(" for workers and buffers")
def dashboard(
    dsn: str | None, data_dir: Path | None, schema: str | None, bind: str, endpoints: tuple[list[str], ...]
) -> None:
    """Serve the web dashboard: queues with their charts, tasks by state, a task's detail, dead
    tasks by error (retry, discard), cancel, pause and resume, brokers and workers.

    Every request needs the token: CONDUIT_DASHBOARD_TOKEN, or one made now and printed (with a
    link that holds it, on stdout). Binds to localhost unless told otherwise; any other address
    is warned about, since whoever has the token can act on every queue."""
    host, port = _bind(bind)
    try:
        import uvicorn

        from conduit.dashboard.app import create_app
        from conduit.dashboard.security import new_token
        from conduit.observe import Observer
    except ImportError as exc:
        raise ConduitError(
            f"the dashboard needs its extra: pip install 'conduit[dashboard]' ({exc})"
        ) from None
    settings = Settings.load(dsn=dsn, data_dir=data_dir, schema=schema)
    url = dsn_for(settings)
    Store.open(url, schema=settings.schema).close()  # a bad DSN or schema: one line, at once
    token = os.environ.get(TOKEN_ENV) or new_token()
    if not _loopback(host):
        click.echo(
            f"warning: serving on {host}, not a loopback address: anyone who can reach it and has the "
            "token can retry, cancel and purge tasks; put it behind TLS",
            err=True,
        )
    try:  # bound here, so that port 0 is resolved before the link is printed
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise ConduitError(f"cannot serve on {bind}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    given = "" if os.environ.get(TOKEN_ENV) else f"?token={token}"
    click.echo(f"http://{shown}:{port}/{given}")
    if given:
        click.echo(f"token: {token} (set {TOKEN_ENV} to choose it)", err=True)
    app = create_app(Observer(url, settings.schema, flat(endpoints)), token)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
