"""The Python Worker's wake-up under a paced load: batches at a fixed rate below capacity, with
short sleeping handlers, so the worker idles between batches and learns of finished handlers
only from its wake-up. A lost wake-up (the loop swallowing a finished handler's byte while its
flag stayed set) left it running `concurrency` tasks per 100 ms poll timeout for good; saturated
bursts never showed it, since a worker sent deliveries all the time is woken by its socket."""

from __future__ import annotations

import os
import time

import pytest
import zmq
from conftest import Process
from test_e2e import SUPPORT, wait_for

from conduit.client import Client
from conduit.client import wakeup as wakeup_module
from conduit.client.wakeup import Wakeup
from conduit.task import TaskSpec


def readable(wakeup: Wakeup) -> bool:
    poller = zmq.Poller()
    poller.register(wakeup.fd, zmq.POLLIN)
    return bool(poller.poll(0))


def test_one_byte_wakes_the_loop_once() -> None:
    wakeup = Wakeup()
    try:
        wakeup.set()
        wakeup.set()  # the second writes nothing
        assert readable(wakeup)
        wakeup.drain()
        assert not readable(wakeup)
        wakeup.set()  # after a drain, the next set wakes the loop again
        assert readable(wakeup)
    finally:
        wakeup.close()


@pytest.mark.parametrize("racing", ["before the read", "after the read"])
def test_a_set_racing_a_drain_is_never_lost(racing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler thread finishing while the loop drains: its own item is collected right after
    the drain, and every later set must still wake the loop. Pinned here by running the racing
    set inside the pipe read, before or after the bytes are taken."""
    wakeup = Wakeup()
    read = os.read

    def racing_read(fd: int, n: int) -> bytes:
        if racing == "before the read":
            wakeup.set()
            return read(fd, n)
        data = read(fd, n)
        wakeup.set()
        return data

    try:
        wakeup.set()
        monkeypatch.setattr(wakeup_module.os, "read", racing_read)
        wakeup.drain()
        monkeypatch.undo()
        if readable(wakeup):  # a spare byte: a harmless extra wake-up
            wakeup.drain()
        wakeup.set()  # the next handler to finish
        assert readable(wakeup), "a set after the drain did not wake the loop: the wake-up was lost"
    finally:
        wakeup.close()


def test_paced_batches_are_run_as_they_arrive(start_broker, processes, db) -> None:
    """Four workers of concurrency 4, one queue each, handlers sleeping 0-20 ms, a batch of 100
    per queue every 0.5 s (200 tasks/s a worker, half what one can run). Each batch takes a
    worker about 0.3 s; a worker that lost its wake-up runs 40 tasks/s and takes 2.5 s."""
    broker = start_broker()
    queues = [f"paced{i}" for i in range(4)]
    for queue in queues:
        env = {"CONDUIT_TEST_ENDPOINT": broker.endpoint, "CONDUIT_TEST_QUEUE": queue}
        processes.append(Process(["worker", "paced:worker"], env={**env, "PYTHONPATH": str(SUPPORT)}))
    batches, size, every = 30, 100, 0.5
    with Client(broker.endpoint) as client:
        for task_id in client.submit_many([TaskSpec(q, b"-1") for q in queues]):
            assert client.result(task_id, timeout=60).state == "completed"  # every worker is up
        start = time.monotonic()
        sent_at = {}  # batch -> wall clock before its submit (the database's clock is the same one)
        for i in range(batches):
            time.sleep(max(0.0, start + i * every - time.monotonic()))
            sent_at[i] = time.time()
            client.submit_many([TaskSpec(q, b"%d" % i) for q in queues for _ in range(size)])
        total = batches * size * len(queues) + len(queues)
        wait_for(lambda: db.query("SELECT count(*) FROM results") == [(total,)], 60, "every task")
    rows = db.query(
        "SELECT queue, convert_from(result, 'UTF8')::int AS batch,"
        " extract(epoch FROM max(finished_at)) FROM results"
        " WHERE state = 'completed' GROUP BY queue, batch"
    )
    assert len(rows) == (batches + 1) * len(queues)
    took = [(float(done) - sent_at[batch], queue, batch) for queue, batch, done in rows if batch >= 0]
    slow = sorted(t for t in took if t[0] > 1.5)
    assert not slow, f"batches that took a worker over 1.5 s (seconds, queue, batch): {slow}"
