"""`conduit top --once` against a running broker with a worker and pending tasks: the queue, its
depth by state, the broker's lease and buffer, and the worker all appear, as JSON and as text."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import uuid

import pytest
from conftest import Database
from test_e2e import running, wait_for

from conduit.client import Client, TaskContext, Worker
from conduit.task import TaskSpec


def top(db: Database, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conduit", "top", "--once", "--dsn", db.dsn, "--schema", db.schema, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_top_once_shows_queue_depth_broker_and_worker(start_broker, db) -> None:
    broker = start_broker("--pub", "tcp://127.0.0.1:0", broker_id="top-b1")
    started, release = threading.Event(), threading.Event()
    worker = Worker(broker.endpoint, concurrency=1, prefetch=0, poll_timeout=1.0, worker_id="top-worker")

    @worker.handler("topq")
    def handle(task: TaskContext) -> bytes:
        started.set()
        release.wait(60)
        return b"done"

    with Client(broker.endpoint) as client, running(worker):
        ids = [client.submit("topq", b"task %d" % i) for i in range(6)]
        wait_for(started.is_set, timeout=60, what="the first task to run")
        try:
            proc = top(db, "--json")
            assert proc.returncode == 0, proc.stderr
            frame = json.loads(proc.stdout)
            (queue,) = [q for q in frame["queues"] if q["queue"] == "topq"]
            assert queue["depth"] == 6 and queue["counts"]["completed"] == 0
            assert sum(queue["counts"].values()) == 6
            assert queue["rate_in"] is not None
            p50, p99 = queue["start_latency_p50"], queue["start_latency_p99"]  # the broker's STATS
            assert p50 is not None and p99 is not None and 0 <= p50 <= p99 < 60
            assert queue["paused"] is False
            (b,) = frame["brokers"]
            assert (b["broker"], b["lease"], b["endpoint"]) == ("top-b1", "live", broker.endpoint)
            assert b["buffered"] is not None  # heard from its gossip
            (w,) = [w for w in frame["workers"] if w["worker"] == "top-worker"]
            assert w["queues"] == ["topq"] and w["broker"] == "top-b1" and w["holding"] >= 1

            text = top(db)
            assert text.returncode == 0, text.stderr
            rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.stdout.splitlines()]
            (cells,) = [row for row in rows if row and row[0] == "topq"]  # the queues table's row
            assert sum(int(c) for c in cells[1:7]) == 6
            assert all(c.replace(".", "").replace(",", "").isdigit() for c in cells[-2:]), cells  # in ms
            assert "top-worker" in text.stdout and "top-b1" in text.stdout and "live," in text.stdout
            assert "\x1b[" not in text.stdout  # plain text when not a terminal
        finally:
            release.set()
        wait_for(lambda: all(r.state == "completed" for r in client.lookup(ids)), what="the tasks to end")


def test_top_errors_are_one_line(db) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "conduit", "top", "--once", "--dsn", "postgresql://nobody@127.0.0.1:1/x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("Error: cannot connect to PostgreSQL")
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "conduit", "top", "--json", "--dsn", db.dsn, "--schema", db.schema],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert usage.returncode == 2 and "--json needs --once" in usage.stderr
    nobroker = top(db, "--json")  # no broker: the queues still show, and the frame says why no workers
    assert nobroker.returncode == 0, nobroker.stderr
    assert json.loads(nobroker.stdout)["problems"] == ["no live broker in the database"]


@pytest.mark.skipif(shutil.which("tmux") is None and not os.environ.get("CI"), reason="needs tmux")
def test_top_live_in_a_terminal_redraws_and_leaves_on_ctrl_c(db, tmp_path) -> None:
    """The live view in a real terminal (a tmux pane of its own): it draws the queue, redraws it
    as the counters change, and Ctrl-C leaves with exit code 0."""
    with db.store() as store:
        store.enqueue([TaskSpec("liveq", b"x")])
    server = ["tmux", "-L", f"conduit-top-{uuid.uuid4().hex[:8]}"]  # a tmux server of this test's own
    done = tmp_path / "rc"
    top = [sys.executable, "-m", "conduit", "top", "--dsn", db.dsn, "--schema", db.schema]
    command = shlex.join(["env", "-u", "COLUMNS", "-u", "LINES", *top])  # the pane's size, not pytest's
    subprocess.run(
        [*server, "new-session", "-d", "-x", "200", "-y", "50", f"{command}; echo $? > {done}"], check=True
    )

    def screen() -> str:
        return subprocess.run([*server, "capture-pane", "-p"], capture_output=True, text=True).stdout

    try:
        wait_for(lambda: "liveq" in screen() and "conduit top" in screen(), what="the first frame")
        with db.store() as store:
            store.enqueue([TaskSpec("liveq", b"y"), TaskSpec("liveq", b"z")])
        wait_for(
            lambda: any(line.split()[:2] == ["liveq", "3"] for line in screen().splitlines()), what="a redraw"
        )
        subprocess.run([*server, "send-keys", "C-c"], check=True)
        wait_for(done.exists, what="top to leave")
        wait_for(lambda: done.read_text().strip() != "", what="its exit code")
        assert done.read_text().strip() == "0"
    finally:
        subprocess.run([*server, "kill-server"], capture_output=True)
