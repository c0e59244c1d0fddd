"""`conduit submit`: one task, and with --wait its end, in a way a shell script can rely on.

The id is printed (and flushed) as soon as the broker has committed the task, so an interrupted
wait still tells which task it left behind; the exit code says how the task ended.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from conduit.commands import keys
from conduit.commands.common import Endpoint

EXIT_DEAD = 3
EXIT_CANCELLED = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130
NO_WORKER_WARNING_AFTER = 3.0  # seconds of waiting before asking brokers who polls the queue

_EPILOG = f"""Exit codes: 0 submitted (with --wait: completed); 1 an error (no broker, refused);
2 a usage error; {EXIT_DEAD} dead; {EXIT_CANCELLED} cancelled; {EXIT_TIMEOUT} still not ended after
--timeout; {EXIT_INTERRUPTED} interrupted while waiting (the task goes on)."""

_SECONDS = click.FloatRange(min=0, max=100 * 365 * 86400.0)


@click.command(epilog=_EPILOG)
@click.argument("queue")
@click.argument("payload")
@click.option(
    "--connect", default="tcp://127.0.0.1:5555", show_default=True, type=Endpoint(), help="Broker endpoint."
)
@click.option("--key", help="Idempotency key: a repeat returns the first task's id.")
@click.option(
    "--priority", default=0, show_default=True, type=click.IntRange(-32768, 32767), help="Lower runs first."
)
@click.option("--delay", default=0.0, show_default=True, type=_SECONDS, help="Seconds before it may run.")
@click.option(
    "--max-attempts",
    default=5,
    show_default=True,
    type=click.IntRange(1, 2**31 - 1),
    help="Runs before it is dead.",
)
@click.option(
    "--lease-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True, max=100 * 365 * 86400.0),
    help="Seconds a run may go without a heartbeat before it is given to another worker.",
)
@click.option(
    "--backoff-base",
    default=1.0,
    show_default=True,
    type=_SECONDS,
    help="First retry after about this many seconds, doubling.",
)
@click.option(
    "--backoff-max", default=300.0, show_default=True, type=_SECONDS, help="Longest pause between retries."
)
@click.option("--wait", is_flag=True, help="Wait for the task to end; print how, and exit with its code.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="With --wait: give up after this many seconds.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print JSON: {"id"} at once, with --wait a second line when it ends.',
)
@keys.client_options
def submit(
    queue: str,
    payload: str,
    connect: str,
    key: str | None,
    priority: int,
    delay: float,
    max_attempts: int,
    lease_timeout: float,
    backoff_base: float,
    backoff_max: float,
    wait: bool,
    timeout: float | None,
    as_json: bool,
    curve_secret: Path | None,
    curve_server: Path | None,
) -> None:
    """Submit one task whose payload is PAYLOAD's UTF-8 bytes ('-' reads stdin); prints its id.

    With --wait it then waits, and warns on stderr when after a few seconds no broker knows a
    worker that polls QUEUE."""
    from conduit.client import Client
    from conduit.curve import ClientCurve

    curve = ClientCurve.load(curve_secret, curve_server)
    data = sys.stdin.buffer.read() if payload == "-" else payload.encode()
    options = {
        "priority": priority,
        "delay": delay,
        "max_attempts": max_attempts,
        "lease_timeout": lease_timeout,
        "backoff_base": backoff_base,
        "backoff_max": backoff_max,
    }
    with Client(connect, curve=curve) as client:
        task_id = client.submit(queue, data, key=key, **options)
        click.echo(json.dumps({"id": task_id}) if as_json else f"id={task_id}")
        sys.stdout.flush()
        if not wait:
            return
        try:
            out = _wait(client, task_id, queue, timeout)
        except KeyboardInterrupt:
            click.echo(f"Error: interrupted; task {task_id} goes on", err=True)
            sys.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps({"id": task_id, **out}))
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in out.items() if v is not None))
    sys.exit(
        {"dead": EXIT_DEAD, "cancelled": EXIT_CANCELLED}.get(
            out["state"], 0 if out["state"] == "completed" else EXIT_TIMEOUT
        )
    )


def _wait(client: Any, task_id: int, queue: str, timeout: float | None) -> dict[str, Any]:
    """Poll the task's state with backoff until it ends or `timeout` passes; on the way, warn once
    if no broker has heard a worker poll its queue."""
    from conduit.errors import ConduitError
    from conduit.task import FINAL_STATES

    began = time.monotonic()
    warned = False
    pause = 0.001
    while True:
        (info,) = client.lookup([task_id])
        if info.state in FINAL_STATES:
            break
        waited = time.monotonic() - began
        if timeout is not None and waited >= timeout:
            click.echo(f"Error: task {task_id} is still {info.state} after {timeout:g}s", err=True)
            break
        if not warned and waited >= NO_WORKER_WARNING_AFTER and info.state != "running":
            warned = True
            try:
                served = any(queue in w.queues for w in client.workers())
            except ConduitError:
                served = True  # no broker would say: no grounds for a warning
            if not served:
                click.echo(
                    f"warning: no worker has polled queue {queue!r} on the brokers in the last minute; "
                    "the task waits until one does",
                    err=True,
                )
        time.sleep(pause)
        pause = min(pause * 1.5, 0.1)
    result = None if info.result is None else info.result.decode("utf-8", "replace")
    return {"state": info.state, "attempt": info.attempt, "error": info.error, "result": result}
