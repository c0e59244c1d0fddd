"""`conduit status` against a live broker: what the database holds as buffered until a worker's
first heartbeat is shown as running, from the brokers' gossip."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from test_e2e import running, wait_for

from conduit.client import Client, TaskContext, Worker


def test_status_counts_delivered_tasks_as_running(start_broker, db) -> None:
    broker = start_broker("--pub", "tcp://127.0.0.1:0")
    release = threading.Event()
    # No heartbeat for 30 s: the database keeps the task as buffered while it runs.
    worker = Worker(broker.endpoint, concurrency=1, prefetch=0, heartbeat_interval=30.0, poll_timeout=1.0)

    @worker.handler("held")
    def held(task: TaskContext) -> bytes:
        release.wait(30)
        return b""

    with running(worker):
        try:
            with Client(broker.endpoint) as client:
                task_id = client.submit("held", b"")
                wait_for(lambda: client.lookup([task_id])[0].state == "buffered", what="the delivery")
            assert db.query("SELECT state, count(*) FROM live_tasks GROUP BY state") == [("buffered", 1)]
            command = ["status", "--json", "--dsn", db.dsn, "--schema", db.schema]
            out = subprocess.run(
                [sys.executable, "-m", "conduit", *command],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
        finally:
            release.set()  # before the worker stops: it waits for its handler
    counts = json.loads(out)["queues"]["held"]
    assert (counts.get("running"), counts.get("buffered", 0)) == (1, 0)
