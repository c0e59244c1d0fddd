"""Take the dashboard screenshots in docs/ (dashboard-*.png) from a real system under a made-up load.

    python docs/screenshots.py [--dsn DSN] [--seconds 90] [--out docs]

A schema of its own, a broker (with gossip) and a dashboard as processes, and an in-process worker
on three queues: `emails` (fast; some addresses bounce for good), `reports` (slower; an upstream
that times out now and then) and `thumbnails` (paused, so a backlog waits). Producers submit at a
rate that rises and falls for `--seconds`, so the 15-minute charts have a shape; then a headless
Chromium (Debian's, through Playwright) opens each page and saves it. Everything it started is
stopped and the schema dropped, also on an error or Ctrl-C. Needs `pip install -e '.[test]'`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import psycopg
from psycopg import sql

from conduit.client import Client, PermanentError, TaskContext, Worker
from conduit.config import Settings
from conduit.store import Store, dsn_for, init_schema

TOKEN = uuid.uuid4().hex
PAGES = {  # file name -> path on the dashboard
    "dashboard-queues.png": "/",
    "dashboard-queue.png": "/queues/emails?state=dead",
    "dashboard-dead.png": "/queues/reports/dead",
    "dashboard-task.png": "/tasks/{dead_email}",
    "dashboard-mesh.png": "/mesh",
}


def progress(message: str) -> None:
    print(f"screenshots: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def scratch_schema(dsn: str) -> Iterator[str]:
    schema = f"screens_{os.getpid()}"
    init_schema(dsn, schema)
    try:
        yield schema
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str] | None = None, lines: int = 1) -> Iterator[list[str]]:
    """`python -m conduit ARGS`, its first `lines` of stdout; stopped (SIGTERM, then kill) after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "conduit", *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        yield [proc.stdout.readline().strip() for _ in range(lines)]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_worker(endpoint: str) -> Worker:
    worker = Worker(endpoint, concurrency=8, poll_timeout=1.0, worker_id="web-1")

    @worker.handler("emails")
    def send(task: TaskContext) -> bytes:
        _name, args, _kwargs = msgpack.unpackb(task.payload)
        if args[0].endswith("@bounce.example"):
            raise PermanentError(f"SMTP 550 5.1.1 <{args[0]}>: mailbox unavailable")
        time.sleep(0.002)
        return msgpack.packb({"message_id": f"<{task.id}@mail.example>", "queued": True})

    @worker.handler("reports")
    def report(task: TaskContext) -> bytes:
        time.sleep(0.02)
        if task.payload.endswith(b"7"):
            raise PermanentError("TimeoutError: upstream billing API took longer than 30 s")
        if task.payload.endswith(b"3"):
            raise PermanentError("KeyError: 'customer_id'")
        return b'{"rows": 1200}'

    return worker


def load(client: Client, seconds: float, stop: threading.Event, bounced: list[int]) -> None:
    """Submit until `stop` at a rate that rises and falls over `seconds`; bounced emails' ids
    go to `bounced`."""
    started, n = time.monotonic(), 0
    while not stop.is_set():
        elapsed = time.monotonic() - started
        rate = 120 + 100 * math.sin(elapsed / seconds * 2 * math.pi * 1.5)
        batch = max(1, int(rate / 4))
        emails = []
        for _ in range(batch):
            n += 1
            to = f"user{n}@bounce.example" if random.random() < 0.01 else f"user{n}@example.com"
            emails.append(msgpack.packb(["send_email", [to], {"subject": "Your order has shipped"}]))
        ids = client.submit_batch("emails", emails)
        for task_id, payload in zip(ids, emails, strict=True):
            if b"bounce" in payload:
                bounced.append(task_id)
        client.submit_batch("reports", [b"report %d" % (n + i) for i in range(max(1, batch // 6))])
        time.sleep(0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: CONDUIT_DSN, else the embedded server)")
    parser.add_argument("--seconds", type=float, default=90.0, help="how long the load runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for the PNGs")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    options = parser.parse_args()
    logging.getLogger("conduit").setLevel(logging.ERROR)  # the made-up failures are the point
    from playwright.sync_api import sync_playwright

    dsn = dsn_for(Settings.load(dsn=options.dsn))
    with contextlib.ExitStack() as stack:
        schema = stack.enter_context(scratch_schema(dsn))
        db = ["--dsn", dsn, "--schema", schema]
        broker = [
            "broker",
            "--broker-id",
            "broker-a",
            "--bind",
            "tcp://127.0.0.1:0",
            "--pub",
            "tcp://127.0.0.1:0",
        ]
        endpoint, _pub = stack.enter_context(process([*broker, *db], lines=2))
        (url,) = stack.enter_context(
            process(["dashboard", "--bind", "127.0.0.1:0", *db], {"CONDUIT_DASHBOARD_TOKEN": TOKEN})
        )
        with Store.open(dsn, schema=schema) as store:
            store.pause("thumbnails")
        client = stack.enter_context(Client(endpoint))
        client.submit_batch("thumbnails", [b"img-%04d.jpg" % i for i in range(1800)])
        worker = make_worker(endpoint)
        runner = threading.Thread(target=worker.run, daemon=True)
        runner.start()
        stack.callback(runner.join, 30)
        stack.callback(worker.stop)
        stop, bounced = threading.Event(), []
        producer = threading.Thread(target=load, args=(client, options.seconds, stop, bounced), daemon=True)
        producer.start()
        stack.callback(producer.join, 30)
        stack.callback(stop.set)
        progress(f"load for {options.seconds:.0f} s, then the screenshots (while it goes on); {url}")
        time.sleep(options.seconds)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=options.chromium)
            page = browser.new_page(viewport={"width": 1500, "height": 900}, device_scale_factor=1)
            page.goto(f"{url.rstrip('/')}/?token={TOKEN}")
            for name, path in PAGES.items():
                page.goto(url.rstrip("/") + path.format(dead_email=bounced[0]))
                page.wait_for_timeout(2500)  # a live refresh: the brokers' gossip heard by then
                page.screenshot(path=str(options.out / name), full_page=False)
                progress(f"saved {options.out / name}")
            browser.close()


if __name__ == "__main__":
    main()
