"""The Client's promises under a silent broker and under threads: an unkeyed submit that timed out
is not repeated elsewhere (it may have been carried out), a late reply is never taken for the
answer to a later request, and one Client serves many threads at once. Its messages are columns,
and a broker of another protocol version is refused with both versions named."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import zmq
from test_e2e import running, wait_for
from test_mesh import Relay

from conduit.client import Client, TaskContext, Worker
from conduit.client.channel import BrokerTimeout
from conduit.task import TaskSpec
from conduit.wire import Command

# What a conduit/1 broker (Conduit 0.1.0) answers any conduit/2 message with, byte for byte
# (docs/PROTOCOL.md §13.5): an ERROR framed conduit/1, with a nil rid.
OLD_REFUSAL = [
    b"conduit/1",
    b"ERROR",
    msgpack.packb(
        {
            "rid": None,
            "code": "bad_version",
            "message": "unsupported protocol 'conduit/2'; this broker speaks conduit/1",
        }
    ),
]


class FakeBroker:
    """A ROUTER on loopback standing in for a broker: `answer` turns each message it receives into
    the frames sent back (None: silence). It keeps what it received, with when, and counts its
    answers."""

    def __init__(self, ctx: zmq.Context, answer: Callable[[list[bytes]], list[bytes] | None]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.answer = answer
        self.received: list[tuple[float, list[bytes]]] = []
        self.answered = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._halt.is_set():
                if not self.sock.poll(50):
                    continue
                peer, *frames = self.sock.recv_multipart()
                self.received.append((time.monotonic(), frames))
                if (reply := self.answer(frames)) is not None:
                    self.sock.send_multipart([peer, *reply])
                    self.answered += 1
        finally:
            self.sock.close()

    def commands(self) -> list[bytes]:
        return [frames[1] for _, frames in self.received if len(frames) > 1]

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)


@pytest.fixture
def fake_broker() -> Iterator[Callable[..., FakeBroker]]:
    ctx = zmq.Context()
    fakes: list[FakeBroker] = []

    def make(answer: Callable[[list[bytes]], list[bytes] | None] = lambda _: OLD_REFUSAL) -> FakeBroker:
        fakes.append(FakeBroker(ctx, answer))
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.close()
    ctx.term()


@pytest.fixture
def relay_to(processes) -> Iterator:
    """Relays in front of brokers, closed after the test (before the brokers are killed)."""
    ctx = zmq.Context()
    relays: list[Relay] = []

    def make(broker) -> Relay:
        relays.append(Relay(ctx, broker.endpoint))
        return relays[-1]

    yield make
    for relay in relays:
        relay.close()
    ctx.term()


def test_an_unkeyed_submit_that_timed_out_is_not_retried_elsewhere(start_broker, relay_to, db) -> None:
    b1, b2 = start_broker(broker_id="b1"), start_broker(broker_id="b2")
    r1, r2 = relay_to(b1), relay_to(b2)
    with Client([r1.endpoint, r2.endpoint], retry_submits=False, timeout=5.0) as client:
        assert client.ping() == "b1"  # no gossip: the configured order
        b1.proc.send_signal(signal.SIGSTOP)  # it has the submit, but will not answer
        try:
            began = time.monotonic()
            with pytest.raises(BrokerTimeout, match="may or may not have been carried out"):
                client.submit("unkeyed", b"x")
            assert time.monotonic() - began < 5.0 + 1.0  # the request's timeout bounds it
        finally:
            b1.proc.send_signal(signal.SIGCONT)
        assert client.ping() in ("b1", "b2")  # usable afterwards
    assert [m for m in r2.requests if m.command is Command.SUBMIT] == []  # nothing sent to b2
    (submit,) = [m.rid for m in r1.requests if m.command is Command.SUBMIT]
    wait_for(lambda: submit in r1.replies, what="b1's late answer")
    late = r1.replies[submit]  # carried out after all, as the error warned it might be
    assert (late.command, late.body["created"]) == (Command.SUBMITTED, [True])
    assert db.query("SELECT id FROM tasks") == [(late.body["ids"][0],)]


def test_a_late_reply_is_not_taken_for_the_answer_to_the_next_request(start_broker, relay_to) -> None:
    broker = start_broker()
    relay = relay_to(broker)
    with Client(relay.endpoint, timeout=5.0) as client:
        first, second = client.submit_many([TaskSpec("idle", b"1"), TaskSpec("idle", b"2")])
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(BrokerTimeout):
                client.lookup([first])
            relay.hold()  # its answer, when it comes, goes to the connection of the next request
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        (asked,) = [m.rid for m in relay.requests if m.command is Command.RESULT]
        wait_for(lambda: asked in relay.replies, what="the late answer")
        for _ in range(3):
            assert [i.id for i in client.lookup([second])] == [second]
    assert asked in relay.handed_over  # the late answer did reach the client, ahead of the next


def test_one_client_used_from_many_threads_at_once(start_broker) -> None:
    broker = start_broker()
    worker = Worker(broker.endpoint, concurrency=8, poll_timeout=1.0)

    @worker.handler("echo")
    def echo(task: TaskContext) -> bytes:
        return task.payload[::-1]

    def work(client: Client, n: int, start: threading.Barrier) -> dict[int, tuple[bytes, bytes | None]]:
        """Submits one at a time and in batches, reads results and looks tasks up, interleaved."""
        start.wait()
        mine: dict[int, bytes] = {}
        for i in range(5):
            payloads = [b"%d-%d-%d" % (n, i, j) for j in range(4)]
            ids = [client.submit("echo", payloads[0])]
            ids += client.submit_many([TaskSpec("echo", p) for p in payloads[1:]])
            mine |= dict(zip(ids, payloads, strict=True))
            assert [t.id for t in client.lookup(ids)] == ids
        return {i: (p, client.result(i, timeout=30).result) for i, p in mine.items()}

    with Client(broker.endpoint) as client, running(worker):
        start = threading.Barrier(8)
        with ThreadPoolExecutor(8) as pool:
            done = list(pool.map(lambda n: work(client, n, start), range(8)))
    ids = [i for d in done for i in d]
    assert len(ids) == len(set(ids)) == 8 * 5 * 4
    assert all(result == payload[::-1] for d in done for payload, result in d.values())


def test_a_conduit_1_broker_is_refused_in_one_line_naming_both_versions(start_broker, fake_broker) -> None:
    """Nothing was done there, so a keyed request goes on to the next broker; with none left, the
    error says which versions met."""
    old = fake_broker()
    with Client(old.endpoint, timeout=5.0) as client:
        began = time.monotonic()
        with pytest.raises(BrokerTimeout) as caught:
            client.submit("q", b"x")
        assert time.monotonic() - began < 1.0  # refused at once, not timed out
    message = str(caught.value)
    assert "bad_version: the broker speaks conduit/1; this peer speaks conduit/2" in message
    assert old.endpoint in message and "\n" not in message
    broker = start_broker()
    with Client([old.endpoint, broker.endpoint], timeout=5.0) as client:
        assert client.ping() == "b1"
        task_id = client.submit("q", b"x")
        assert client.lookup([task_id])[0].state == "pending"
    assert set(old.commands()) <= {b"PING", b"SUBMIT"}  # asked, refused, never again for that request


def test_submit_batch_sends_columns_shared_options_once(start_broker, relay_to, db) -> None:
    """submit_batch: one value for every task goes once; a sequence is one value per task (None
    for the default); more than MAX_BATCH tasks go in several messages."""
    relay = relay_to(start_broker())
    with Client(relay.endpoint) as client:
        ids = client.submit_batch(
            "cols", [b"a", b"b", b"c"], priority=-2, delay=[0, None, 60], idempotency_key=["k", None, None]
        )
        assert client.submit_batch("cols", [b"k"], idempotency_key="k") == ids[:1]  # the key is the first's
        many = client.submit_batch("many", [b"%d" % i for i in range(10_001)], max_attempts=2)
    first, again, big, rest = [m.body for m in relay.requests if m.command is Command.SUBMIT]
    assert {k: v for k, v in first.items() if k not in ("rid", "key")} == {
        "queue": "cols",
        "payload": [b"a", b"b", b"c"],
        "priority": -2,
        "delay": [0, None, 60],
        "idempotency_key": ["k", None, None],
    }
    assert "key" in first and again["idempotency_key"] == "k"  # a batch's own key; a lone task's
    assert (len(big["payload"]), len(rest["payload"]), big["max_attempts"]) == (10_000, 1, 2)
    rows = db.query(
        "SELECT id, priority, run_at > now() + interval '50 seconds', idempotency_key FROM tasks "
        "WHERE queue = 'cols' ORDER BY id"
    )
    assert rows == [(ids[0], -2, False, "k"), (ids[1], -2, False, None), (ids[2], -2, True, None)]
    assert len(set(many)) == 10_001
    assert db.query(
        "SELECT count(*), min(p.max_attempts) FROM tasks t JOIN policies p ON p.id = t.policy"
        " WHERE queue = 'many'"
    ) == [(10_001, 2)]


def test_submit_many_sends_each_field_once_when_every_task_shares_it(start_broker, relay_to) -> None:
    relay = relay_to(start_broker())
    with Client(relay.endpoint) as client:
        client.submit_many([TaskSpec("same", b"%d" % i, priority=3, lease_timeout=9.0) for i in range(3)])
        client.submit_many([TaskSpec("a", b"1"), TaskSpec("b", b"2", delay=5.0)])
    same, mixed = [m.body for m in relay.requests if m.command is Command.SUBMIT]
    assert (same["queue"], same["priority"], same["lease_timeout"]) == ("same", 3, 9.0)
    assert "delay" not in same and "max_attempts" not in same  # defaults are not sent at all
    assert (mixed["queue"], mixed["delay"]) == (["a", "b"], [0.0, 5.0])
