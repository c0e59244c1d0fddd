"""A mesh across hosts: brokers, a worker and a client in network namespaces of their own (each
at its own address), PostgreSQL reached through a proxy on the database network, as a remote
server would be. A client given one broker on another host finds all three and uses them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from netns.hosts import Network, unavailable
from netns.pgproxy import PgProxy
from test_e2e import wait_for

from conduit.client import Client, TaskContext, Worker
from conduit.task import TaskSpec

WHY = unavailable()
# In CI (root, iproute2 installed by .ci/run) missing test hosts fail the tests instead.
needs_hosts = pytest.mark.skipif(WHY is not None and not os.environ.get("CI"), reason=f"no test hosts: {WHY}")


@pytest.fixture
def net() -> Iterator[Network]:
    with Network(brokers=3, workers=1, clients=1) as network:
        yield network


@contextmanager
def running_in(net: Network, host: str, worker: Worker) -> Iterator[None]:
    """The worker running on `host` (a thread in its network), stopped at the end."""
    thread = threading.Thread(target=net.run_in, args=(host, worker.run), daemon=True)
    thread.start()
    try:
        yield
    finally:
        worker.stop()
        thread.join(30)
        assert not thread.is_alive(), "worker did not stop"


@needs_hosts
def test_a_client_given_one_broker_on_another_host_finds_all_three_and_uses_them(net, db) -> None:
    proxy = PgProxy(db.dsn, net.db_gateway).start()
    brokers, logs = [], []
    try:
        for name in net.names("b"):
            log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed below
            argv = [sys.executable, "-m", "conduit", "broker", *net.broker_options(name)]
            argv += ["--broker-id", name, "--lease-term", "3", "--dsn", proxy.dsn(), "--schema", db.schema]
            proc = net.popen(name, argv, stdout=subprocess.PIPE, stderr=log)
            brokers.append(proc)
            logs.append(log)
            line = proc.stdout.readline().strip()  # type: ignore[union-attr]
            assert line == f"tcp://{net.host(name).address}:5555", line  # advertised, not 0.0.0.0
        endpoints = {f"tcp://{net.host(n).address}:5555" for n in net.names("b")}
        assert {row[0] for row in db.query("SELECT endpoint FROM brokers")} == endpoints
        b1, b3 = (f"tcp://{net.host(n).address}:5555" for n in ("b1", "b3"))
        worker = Worker([b3], concurrency=4, poll_timeout=1.0)
        ran: list[str] = []

        @worker.handler("q")
        def handle(task: TaskContext) -> None:
            ran.append(task.broker)

        with net.enter("c1"):
            client = Client([b1], timeout=5)
        with running_in(net, "w1", worker), client:
            assert client.ping() == "b1"
            wait_for(lambda: {v.endpoint for v in client.brokers()} == endpoints, what="the whole mesh")
            ids = client.submit_many([TaskSpec("q", b"") for _ in range(10)])
            assert all(client.result(i, timeout=30).state == "completed" for i in ids)
            net.cut("b1")  # the only broker the client was given is gone from the mesh network
            began = time.monotonic()
            ids = client.submit_many([TaskSpec("q", b"") for _ in range(10)])  # through b2 or b3
            assert all(client.result(i, timeout=30).state == "completed" for i in ids)
            assert time.monotonic() - began < 25
            # its gossip is not heard: gone from the mesh within three gossip intervals
            wait_for(lambda: {v.endpoint for v in client.brokers()} == endpoints - {b1}, what="b1 gone")
            net.heal("b1")
            wait_for(lambda: {v.endpoint for v in client.brokers()} == endpoints, what="b1 heard again")
        assert len(ran) == 20 and set(ran) <= {"b1", "b2", "b3"}
    finally:
        for proc in brokers:
            proc.terminate()
        for proc in brokers:
            proc.wait(30)
            proc.stdout.close()  # type: ignore[union-attr]
        for log in logs:
            log.close()
        proxy.close()


def test_the_database_proxy_cuts_holds_one_way_and_heals(db) -> None:
    """The proxy alone, on loopback (no namespaces needed): a cut or a one-way hold stalls one
    source's queries without failing them; healed, they finish in order, on the same connection."""
    proxy = PgProxy(db.dsn, "127.0.0.1").start()
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            for trouble in (proxy.cut, lambda source: proxy.hold(source, "down")):
                trouble("127.0.0.1")
                answer: list[object] = []
                asking = threading.Thread(
                    target=lambda out=answer: out.append(conn.execute("SELECT 2").fetchone())
                )
                asking.start()
                asking.join(0.5)
                assert asking.is_alive() and answer == []  # stalled, not refused
                proxy.heal("127.0.0.1")
                asking.join(10)
                assert answer == [(2,)]
            proxy.delay("127.0.0.1", "up", 0.01)
            assert conn.execute("SELECT 3").fetchone() == (3,)  # slowed, not broken
    finally:
        proxy.close()
