"""The NOTIFY wake-up end to end: a broker whose poller waits on a drained queue leases at once
when another broker commits tasks for it (or an application enqueues them in its own
transaction), not at its next periodic re-read. Broker A re-reads a drained queue only every
60 s here, so only the wake-up explains a prompt start; a task inserted without a NOTIFY shows
that nothing else wakes it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from conftest import Process
from test_e2e import running, wait_for

from conduit.client import Client, TaskContext, Worker
from conduit.task import TaskSpec

TUNED_BROKER = Path(__file__).parent / "e2e_support" / "tuned_broker.py"
PROMPTLY = 1.0  # seconds: a wake-up costs a commit and a read; the re-read would take 60


def tuned_broker(db, processes, broker_id: str, **settings: float) -> str:
    args = [str(TUNED_BROKER), db.dsn, db.schema, broker_id, *(f"{k}={v}" for k, v in settings.items())]
    broker = Process(args, program=[sys.executable])
    processes.append(broker)
    assert broker.proc.stdout is not None
    endpoint = broker.proc.stdout.readline().strip()
    assert endpoint, broker.log()
    return endpoint


def test_a_commit_elsewhere_wakes_a_broker_whose_poller_waits(db, processes, start_broker) -> None:
    a = tuned_broker(db, processes, "a", idle_recheck=60.0)
    b = start_broker(broker_id="b")
    started: dict[bytes, float] = {}
    worker = Worker(a, concurrency=4, poll_timeout=1.0)  # polls A only

    @worker.handler("woken")
    def handle(task: TaskContext) -> None:
        started[task.payload] = time.monotonic()

    with db.store() as store:
        store.enqueue([TaskSpec("woken", b"first")])  # A's first read takes it and finds no more
    with db.store() as store, running(worker), Client(b.endpoint) as client:
        wait_for(lambda: b"first" in started, what="A's first read")
        store.enqueue([TaskSpec("woken", b"unannounced")])  # committed without a NOTIFY
        time.sleep(1.5)  # three of the usual 0.5 s re-reads
        assert b"unannounced" not in started  # A does not read again by itself

        submitted = time.monotonic()
        client.submit("woken", b"through b")  # B commits it and NOTIFYs; A re-reads at once
        wait_for(lambda: b"through b" in started, timeout=5, what="the task submitted through B")
        assert started[b"through b"] - submitted < PROMPTLY
        assert b"unannounced" in started  # the same read took the older task too

        enqueued = time.monotonic()
        db.query("SELECT enqueue('woken', 'in a transaction'::bytea)")  # the SQL function's NOTIFY
        wait_for(lambda: b"in a transaction" in started, timeout=5, what="the task enqueued in SQL")
        assert started[b"in a transaction"] - enqueued < PROMPTLY
