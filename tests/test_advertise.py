"""Advertised endpoints and peers: a broker bound to every interface names the address given by
--advertise, records both its endpoints in the database, and names its live peers in PONG and
GOSSIP, so a client or worker given one broker finds the mesh (PROTOCOL.md §6.6, §6.8)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import zmq
from conftest import free_port
from test_e2e import running, wait_for

from conduit.client import Client, TaskContext, Worker
from conduit.task import TaskSpec
from conduit.wire import REPLIES, Command, decode, encode


def advertised_mesh(start_broker, n: int = 3) -> list:
    """Brokers bound to 0.0.0.0, advertised as 127.0.0.1 (the address this host reaches them by)."""
    brokers = []
    for i in range(1, n + 1):
        port, pub = free_port(), free_port()
        brokers.append(
            start_broker(
                *("--pub", f"tcp://0.0.0.0:{pub}", "--advertise-pub", f"tcp://127.0.0.1:{pub}"),
                *("--advertise", f"tcp://127.0.0.1:{port}"),
                broker_id=f"b{i}",
                bind=f"tcp://0.0.0.0:{port}",
            )
        )
    return brokers


def ping(endpoint: str) -> dict:
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart(encode(Command.PING, {"rid": 1}))
        assert sock.poll(5000), f"no PONG from {endpoint}"
        return decode(sock.recv_multipart(), allowed=REPLIES).body


def test_brokers_record_their_advertised_endpoints_and_name_their_peers(start_broker, db) -> None:
    b1, b2, b3 = advertised_mesh(start_broker)
    assert b1.endpoint.startswith("tcp://127.0.0.1:") and b1.pub.startswith("tcp://127.0.0.1:")
    rows = db.query("SELECT id, endpoint, pub FROM brokers ORDER BY id")
    assert rows == [("b1", b1.endpoint, b1.pub), ("b2", b2.endpoint, b2.pub), ("b3", b3.endpoint, b3.pub)]
    want = {("b2", b2.endpoint, b2.pub), ("b3", b3.endpoint, b3.pub)}
    # b1 started first: it reads its peers again with its next lease renewal (a third of 3 s)
    wait_for(lambda: {(p["broker"], p["endpoint"], p["pub"]) for p in ping(b1.endpoint)["peers"]} == want)
    gossip = zmq.Context.instance().socket(zmq.SUB)
    gossip.setsockopt(zmq.LINGER, 0)
    gossip.setsockopt(zmq.SUBSCRIBE, b"")
    gossip.connect(b3.pub)
    try:
        assert gossip.poll(5000)
        body = decode(gossip.recv_multipart(), allowed=frozenset({Command.GOSSIP})).body
        assert (body["endpoint"], body["pub"]) == (b3.endpoint, b3.pub)
        assert {p["broker"] for p in body["peers"]} == {"b1", "b2"}
    finally:
        gossip.close()


def test_a_stopped_broker_is_no_longer_named(start_broker, db) -> None:
    b1, b2 = advertised_mesh(start_broker, 2)
    wait_for(lambda: [p["broker"] for p in ping(b1.endpoint)["peers"]] == ["b2"])
    assert b2.stop() == 0  # a clean stop ends its lease at once
    wait_for(lambda: ping(b1.endpoint)["peers"] == [])


def test_status_given_one_gossip_endpoint_shows_the_whole_mesh(start_broker, db) -> None:
    b1, *_ = advertised_mesh(start_broker)
    wait_for(lambda: len(ping(b1.endpoint)["peers"]) == 2)
    args = ["status", "--json", "--dsn", db.dsn, "--schema", db.schema, "--gossip", b1.pub]
    shown = subprocess.run(
        [sys.executable, "-m", "conduit", *args], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert sorted(json.loads(shown.stdout)["brokers"]) == ["b1", "b2", "b3"]


def test_a_client_and_a_worker_given_one_broker_use_the_whole_mesh(start_broker, db) -> None:
    b1, b2, b3 = advertised_mesh(start_broker)
    wait_for(lambda: len(ping(b1.endpoint)["peers"]) == 2)
    worker = Worker([b1.endpoint], concurrency=4, poll_timeout=1.0)
    brokers: set[str] = set()

    @worker.handler("q")
    def handle(task: TaskContext) -> None:
        brokers.add(task.broker)

    with running(worker), Client([b1.endpoint], timeout=5) as client:
        client.ping()  # the first answered request makes it ask for gossip: b1's and its peers'
        wait_for(lambda: {v.endpoint for v in client.brokers()} == {b.endpoint for b in (b1, b2, b3)})
        # an idle worker spreads its polls over the brokers it hears of: b1 named the others
        wait_for(lambda: {w.broker for w in client.workers() if w.polls} & {"b2", "b3"}, what="polls")
        assert b1.stop() == 0  # the only broker either was given
        began = time.monotonic()
        ids = client.submit_many([TaskSpec("q", b"") for _ in range(20)])  # through b2 or b3
        assert all(client.result(i, timeout=30).state == "completed" for i in ids)
        assert time.monotonic() - began < 20
    assert brokers & {"b2", "b3"}, brokers  # the worker moved to a broker it was never given
