"""Pausing a queue across a mesh of two brokers, on real PostgreSQL and sockets: through the
Client and the CLI, learnt at once from the NOTIFY or within a second from the keeper's read.
Submits are kept while paused; after the resume every task runs, none lost, none twice."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from conftest import BrokerProcess
from test_cli_ops import conduit, ok
from test_e2e import running, wait_for
from test_store_ops import truth

from conduit.client import AsyncClient, Client, TaskContext, Worker

KNOWN = 5.0  # every broker knows of a pause within about a second: a margin for a busy machine


class Runs:
    """Which tasks the workers started, in the order they started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[tuple[str, int]] = []  # (queue, id)

    def worker(self, endpoint: str, name: str) -> Worker:
        worker = Worker(endpoint, concurrency=2, prefetch=0, poll_timeout=1.0, worker_id=name)

        def handle(task: TaskContext) -> bytes:
            with self.lock:
                self.started.append((task.queue, task.id))
            time.sleep(0.005)
            return b"done"

        worker.handler("work")(handle)
        worker.handler("other")(handle)  # its polls list both queues: one paused, one not
        return worker

    def of(self, queue: str) -> list[int]:
        with self.lock:
            return [i for q, i in self.started if q == queue]


@contextmanager
def mesh(start_broker) -> Iterator[tuple[Runs, Client, Client, Callable[[str], None]]]:
    """Two brokers, each with a worker of its own and a client of its own; and a wait until both
    brokers logged an event about the queue "work"."""
    b1, b2 = start_broker(broker_id="b1"), start_broker(broker_id="b2")

    def logged(event: str) -> None:
        def heard(broker: BrokerProcess) -> bool:
            return any(
                f"event={event} " in line and "queue=work" in line for line in broker.log().splitlines()
            )

        wait_for(lambda: heard(b1) and heard(b2), KNOWN, f"both brokers' {event}")

    runs = Runs()
    with ExitStack() as stack:
        c1 = stack.enter_context(Client(b1.endpoint))
        c2 = stack.enter_context(Client(b2.endpoint))
        stack.enter_context(running(runs.worker(b1.endpoint, "w1")))
        stack.enter_context(running(runs.worker(b2.endpoint, "w2")))
        yield runs, c1, c2, logged


def submit_through_both(c1: Client, c2: Client, n: int, tag: str) -> list[int]:
    return [c.submit("work", b"%s %d" % (tag.encode(), i)) for i in range(n) for c in (c1, c2)]


def finish(client: Client, ids: list[int]) -> None:
    for i in ids:
        assert client.result(i, timeout=60).state == "completed"


def test_a_pause_through_one_broker_stops_both_and_after_the_resume_all_runs_once(start_broker, db) -> None:
    with mesh(start_broker) as (runs, c1, c2, logged):
        before = submit_through_both(c1, c2, 10, "before")
        finish(c1, before)
        assert {i for i in runs.of("work")} == set(before)
        assert c1.pause("work") is True
        assert c2.pause("work") is False  # paused already, whichever broker is asked
        logged("queue_paused")
        started = len(runs.of("work"))
        during = submit_through_both(c1, c2, 15, "during")  # accepted and kept, by both
        other = c2.submit("other", b"x")  # the other queue of the same polls keeps running
        assert c1.result(other, timeout=30).state == "completed"
        time.sleep(1.0)
        assert len(runs.of("work")) == started, "a paused queue's task started"
        assert {r.state for r in c1.lookup(during)} == {"pending"}
        assert ok(conduit(db, "queues", "--json"))["queues"]["work"]["pending"] == len(during)
        assert c2.resume("work") is True and c1.resume("work") is False
        finish(c2, during)
        ran = Counter(runs.of("work"))
        assert set(ran) == set(before) | set(during) and set(ran.values()) == {1}  # none lost, none twice
        assert truth(db)["work"] == {"completed": len(before) + len(during)}


def test_a_pause_from_the_cli_and_a_resume_heard_only_on_the_keepers_tick(start_broker, db) -> None:
    with mesh(start_broker) as (runs, c1, c2, logged):
        finish(c1, submit_through_both(c1, c2, 3, "warm"))
        assert ok(conduit(db, "queues", "pause", "work", "--json")) == {
            "queue": "work",
            "paused": True,
            "changed": True,
        }
        again = conduit(db, "queues", "pause", "work")
        assert (again.returncode, again.stdout) == (0, "work was paused already\n")
        logged("queue_paused")
        started = len(runs.of("work"))
        during = submit_through_both(c1, c2, 10, "during")
        time.sleep(1.0)
        assert len(runs.of("work")) == started
        listing = ok(conduit(db, "queues", "--json"))
        assert list(listing["paused"]) == ["work"] and listing["queues"]["work"]["pending"] == len(during)
        table = conduit(db, "queues").stdout.splitlines()
        assert table[0].split()[-1] == "paused"
        assert [line.split()[-1] for line in table[1:] if line.startswith("work")] == ["yes"]
        # A resume that sends no NOTIFY (as if the listener had missed it): the keeper's read
        # of the set, every second, finds it.
        assert db.query("DELETE FROM paused_queues WHERE queue = 'work' RETURNING queue") == [("work",)]
        finish(c1, during)
        assert set(Counter(runs.of("work")).values()) == {1}
        resumed = conduit(db, "queues", "resume", "work")
        assert (resumed.returncode, resumed.stdout) == (0, "work was not paused\n")


def test_the_queue_commands_say_what_they_did_and_refuse_a_bad_name(db) -> None:
    assert conduit(db, "queues", "pause", "mail").stdout == "mail paused\n"
    assert conduit(db, "queues", "resume", "mail").stdout == "mail resumed\n"
    assert ok(conduit(db, "queues", "resume", "mail", "--json"))["changed"] is False
    bad = conduit(db, "queues", "resume", "no spaces")
    assert (bad.returncode, bad.stdout) == (2, "") and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("Error: Invalid value for 'QUEUE': queue name 'no spaces' is not valid")
    assert ok(conduit(db, "queues", "--json"))["paused"] == {}


def test_the_async_client_pauses_and_resumes(start_broker, db) -> None:
    broker = start_broker()

    async def main() -> list[bool]:
        async with AsyncClient(broker.endpoint) as client:
            return [await client.pause("q"), await client.pause("q"), await client.resume("q")]

    assert asyncio.run(main()) == [True, False, True]
    assert db.query("SELECT count(*) FROM paused_queues") == [(0,)]
