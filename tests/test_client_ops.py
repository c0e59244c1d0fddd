"""The operations of `conduit tasks` and `conduit queues` on the Client and the AsyncClient,
through a real broker: the same answers as the Store gives, bad requests refused before the
database, and the counters still equal to the rows after a redrive and a purge."""

from __future__ import annotations

import asyncio
import base64

import pytest
from test_e2e import running, wait_for
from test_store_ops import truth

from conduit.client import AsyncClient, BrokerError, Client, PermanentError, TaskContext, Worker
from conduit.errors import ConduitError
from conduit.wire import Command


def pages(list_tasks, **filters: object) -> list[tuple[list[int], str | None]]:
    """Every page of a listing, two rows a page: ids and the cursor that followed."""
    out, after = [], None
    while True:
        page = list_tasks(limit=2, after=after, **filters)
        out.append(([r.id for r in page.rows], page.next))
        if page.next is None:
            return out
        after = page.next


def test_the_client_lists_shows_redrives_and_purges_as_the_store_does(start_broker, db) -> None:
    broker = start_broker()
    worker = Worker(broker.endpoint, concurrency=2, poll_timeout=1.0, worker_id="ops-client")

    @worker.handler("ops")
    def handle(task: TaskContext) -> bytes:
        if task.payload.startswith(b"bad"):
            raise PermanentError("bad payload")
        return task.payload.upper()

    with Client(broker.endpoint) as client, db.store() as store:
        with running(worker):
            done = client.submit("ops", b"fine")
            dead = [client.submit("ops", b"bad %d" % i) for i in range(3)]
            for task_id in (done, *dead):
                client.result(task_id, timeout=30)
        later = [client.submit("ops", b"later %d" % i, delay=3600) for i in range(3)]

        assert client.queues() == store.queue_stats() == {"ops": {"pending": 3, "completed": 1, "dead": 3}}
        for filters in ({}, {"state": "dead"}, {"state": "pending", "queue": "ops"}, {"state": "completed"}):
            assert pages(client.list_tasks, **filters) == pages(store.list_tasks, **filters), filters
        rows = client.list_tasks(state="dead", limit=10).rows
        assert rows == store.list_tasks(state="dead", limit=10).rows
        assert {r.id for r in rows} == set(dead)
        assert [r.since for r in rows] == sorted((r.since for r in rows), reverse=True)  # newest first

        asked = [done, dead[0], later[0], 10**12]
        details = client.show(asked)
        assert details == store.show(asked)  # every field, datetimes to the microsecond
        assert [(d.id, d.state, d.result, d.error) for d in details[:2]] == [
            (done, "completed", b"FINE", None),
            (dead[0], "dead", None, "PermanentError: bad payload"),
        ]
        assert details[2].payload == b"later 0" and details[2].run_at is not None

        assert client.redrive("ops") == 3
        assert {i.state for i in client.lookup(dead)} == {"pending"}
        assert client.redrive("ops") == 0
        assert client.purge("ops") == 6  # the redriven and the delayed: none had started
        assert {i.state for i in client.lookup([*dead, *later])} == {"cancelled"}
        assert client.queues() == truth(db) == {"ops": {"completed": 1, "cancelled": 6}}

        with pytest.raises(BrokerError) as refused:
            client.list_tasks(state="lost")
        assert refused.value.code == "bad_request" and "lost" in str(refused.value)
        with pytest.raises(BrokerError) as refused:
            client.list_tasks(after="not-a-cursor")
        assert refused.value.code == "bad_request" and "cursor" in str(refused.value)
        with pytest.raises(BrokerError) as refused:
            client.list_tasks(queue="no spaces")
        assert refused.value.code == "invalid_task"
        for cursor in (
            base64.urlsafe_b64encode(b'["live", 1e999]').decode(),  # an id past any integer
            base64.urlsafe_b64encode(b"[" * 5000).decode(),  # nested past reading
            "x" * 100_000,
        ):
            with pytest.raises(BrokerError) as refused:
                client.list_tasks(after=cursor)
            assert refused.value.code == "bad_request" and "cursor" in str(refused.value)
        with pytest.raises(ConduitError, match="not valid"):
            client.purge("no spaces")  # checked before anything is sent
        assert client.queues() == {"ops": {"completed": 1, "cancelled": 6}}  # the refusals changed nothing


def test_the_async_client_has_the_same_operations(start_broker, db) -> None:
    broker = start_broker()

    async def main() -> None:
        async with AsyncClient(broker.endpoint) as client:
            ids = [await client.submit("aops", b"x%d" % i, delay=3600) for i in range(3)]
            assert await client.queues() == {"aops": {"pending": 3}}
            page = await client.list_tasks(queue="aops", state="pending", limit=2)
            assert [r.id for r in page.rows] == ids[:2] and page.next is not None
            assert [d.payload for d in await client.show(ids)] == [b"x0", b"x1", b"x2"]
            assert await client.purge("aops") == 3
            assert await client.redrive("aops") == 0

    asyncio.run(main())
    wait_for(lambda: truth(db) == {"aops": {"cancelled": 3}}, what="the counters to settle")


def test_show_answers_big_tasks_in_as_many_replies_as_they_need(start_broker, db) -> None:
    """SHOW takes a few ids at a time, and a reply holds at most 8 MiB of payloads: the Client asks
    again for the rest, so any number of tasks of any size comes back, in order."""
    broker = start_broker()
    with Client(broker.endpoint) as client:
        big = [client.submit("big", bytes([i]) * 1_000_000, delay=3600) for i in range(12)]
        small = client.submit_batch("big", [b"s%d" % i for i in range(40)], delay=3600)
        asked = [*big, 10**12, *small]
        details = client.show(asked)
        assert [d.id for d in details] == [*big, *small]
        assert [len(d.payload or b"") for d in details[:12]] == [1_000_000] * 12
        assert details[12].payload == b"s0"
        with pytest.raises(BrokerError) as refused:  # a raw SHOW of too many ids is refused
            client._request(Command.SHOW, {"ids": small[:33]}, retry_safe=True)
        assert refused.value.code == "too_large"
