"""End to end over real sockets and real PostgreSQL: broker processes, clients, workers, kills."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import zmq

from conduit.client import Client, PermanentError, TaskContext, Worker
from conduit.client.channel import BrokerError, Channel
from conduit.client.mesh import Mesh
from conduit.task import TaskSpec
from conduit.wire import PROTOCOL, Command

SUPPORT = Path(__file__).parent / "e2e_support"


@contextmanager
def running(worker: Worker) -> Iterator[threading.Thread]:
    """The worker running in a thread (which a test can watch for dying), stopped at the end."""
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        worker.stop()
        thread.join(30)
        assert not thread.is_alive(), "worker did not stop"


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _ledger_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line] if path.exists() else []


def ledger_runs(path: Path) -> list[tuple[int, int, int]]:
    """(task, attempt, pid) of every run so far; fields after the third are ignored."""
    return [(int(f[0]), int(f[1]), int(f[2])) for f in _ledger_lines(path)]


def run_starts(path: Path) -> dict[tuple[int, int], float]:
    """When each (task, attempt) started, in wall-clock seconds (handlers that record it)."""
    return {(int(f[0]), int(f[1])): float(f[3]) for f in _ledger_lines(path)}


def spawn_worker(processes, endpoint: str, ledger: Path, concurrency: int = 2):
    from conftest import Process

    env = {
        "CONDUIT_TEST_ENDPOINT": endpoint,
        "CONDUIT_TEST_LEDGER": str(ledger),
        "CONDUIT_TEST_CONCURRENCY": str(concurrency),
        "PYTHONPATH": str(SUPPORT),
    }
    worker = Process(["worker", "handlers:worker"], env=env)
    processes.append(worker)
    return worker


def test_submit_execute_result(start_broker, db) -> None:
    broker = start_broker()
    worker = Worker(broker.endpoint, concurrency=2, poll_timeout=1.0)

    @worker.handler("echo")
    def echo(task: TaskContext) -> bytes:
        return b"%s/%d" % (task.payload, task.attempt)

    @worker.handler("flaky")
    def flaky(task: TaskContext) -> bytes:
        if task.failures < 2:
            raise RuntimeError(f"try {task.attempt}")
        return b"third time"

    @worker.handler("bad")
    def bad(task: TaskContext) -> None:
        raise PermanentError("cannot be done")

    with Client(broker.endpoint) as client, running(worker):
        ids = client.submit_many([TaskSpec("echo", b"t%d" % i) for i in range(50)])
        assert [client.result(i, timeout=30).result for i in ids] == [b"t%d/1" % i for i in range(50)]
        flaky_id = client.submit("flaky", b"", backoff_base=0.05)
        bad_id = client.submit("bad", b"")
        done = client.result(flaky_id, timeout=30)
        assert (done.state, done.result, done.attempt) == ("completed", b"third time", 3)
        dead = client.result(bad_id, timeout=30)
        assert dead.state == "dead" and "cannot be done" in (dead.error or "")
        assert client.submit("echo", b"k", key="once") == client.submit("echo", b"k", key="once")
        later = client.submit("echo", b"later", delay=30)
        assert client.cancel(later) and not client.cancel(later)
        assert client.result(later, timeout=5).state == "cancelled"
    assert db.query("SELECT count(*) FROM tasks") == [(0,)]


def test_a_worker_drops_tasks_whose_lease_a_heartbeat_says_is_lost(start_broker, caplog) -> None:
    """Cancelled while held: the prefetched one never runs, the running one is no longer
    heartbeated and its result is not sent (it would only be refused)."""
    broker = start_broker()
    worker = Worker(broker.endpoint, concurrency=1, prefetch=1, heartbeat_interval=0.2, poll_timeout=1.0)
    release = threading.Event()
    ran: list[bytes] = []

    @worker.handler("hold")
    def hold(task: TaskContext) -> bytes:
        ran.append(task.payload)
        release.wait(30)
        return b"too late"

    caplog.set_level("INFO", logger="conduit.worker")
    with Client(broker.endpoint) as client, running(worker):
        running_id = client.submit("hold", b"running")
        wait_for(lambda: ran == [b"running"], what="the first task to start")
        held_id = client.submit("hold", b"prefetched")
        wait_for(lambda: client.lookup([held_id])[0].state == "running", what="the prefetch")
        assert client.cancel(running_id) and client.cancel(held_id)
        lost = lambda: {r.fields["task"] for r in caplog.records if r.msg == "lease_lost"}  # noqa: E731
        wait_for(lambda: lost() == {running_id, held_id}, what="heartbeats to report both lost")
        release.set()
        time.sleep(1.0)  # a heartbeat or two more, and the handler's outcome collected
        assert ran == [b"running"]
        assert [r.fields["task"] for r in caplog.records if r.msg == "lease_lost"].count(running_id) == 1
        assert not [r for r in caplog.records if r.msg == "refused"]
        assert {i.state for i in client.lookup([running_id, held_id])} == {"cancelled"}


def polls_waiting(pub: str, queue: str, count: int) -> None:
    """Wait until a broker's gossip shows `count` polls waiting on `queue`: its workers are ready."""
    ctx = zmq.Context()
    mesh = Mesh(ctx, [], [pub])

    def enough() -> bool:
        mesh.update()
        return any(v.polls([queue]) >= count for v in mesh.live())

    try:
        wait_for(enough, what=f"{count} polls waiting on {queue}")
    finally:
        mesh.close()
        ctx.term()


def test_killed_worker_task_is_redelivered_after_its_lease_and_completed_once(
    start_broker, processes, db, tmp_path: Path
) -> None:
    broker = start_broker("--pub", "tcp://127.0.0.1:*")
    ledger = tmp_path / "ledger"
    workers = {w.proc.pid: w for w in (spawn_worker(processes, broker.endpoint, ledger) for _ in range(2))}
    polls_waiting(broker.pub, "sleepy", 2)  # the survivor is ready: only the lease delays the rerun
    with Client(broker.endpoint) as client:
        task_id = client.submit("sleepy", b"1.0", lease_timeout=2.0, backoff_base=0)

        def lease_expiry() -> float | None:
            rows = db.query(
                "SELECT extract(epoch FROM lease_expires_at) FROM live_tasks WHERE state = 'running'"
            )
            return float(rows[0][0]) if rows else None

        wait_for(lambda: ledger_runs(ledger) and lease_expiry(), what="the first run, under a task lease")
        expires = lease_expiry()  # read before the kill: a heartbeat since can only have extended it
        assert expires is not None
        first = ledger_runs(ledger)[0][2]
        workers[first].kill()  # SIGKILL mid-task: no complete, no more heartbeats
        result = client.result(task_id, timeout=60)
    runs = ledger_runs(ledger)
    assert [(t, a) for t, a, _ in runs] == [(task_id, 1), (task_id, 2)]
    assert runs[1][2] in workers and runs[1][2] != first  # the other worker ran it
    assert (result.state, result.result, result.attempt) == ("completed", b"slept 2", 2)
    assert run_starts(ledger)[(task_id, 2)] >= expires  # not before the lease could have expired
    assert db.query("SELECT failures FROM results WHERE id = %s", (task_id,)) == [(1,)]


def test_stale_complete_after_redelivery_is_refused(start_broker, db) -> None:
    broker = start_broker()
    ctx = zmq.Context()
    a, b = Channel(ctx, broker.endpoint), Channel(ctx, broker.endpoint)
    try:
        with Client(broker.endpoint) as client:
            task_id = client.submit("fenced", b"x", lease_timeout=0.5, backoff_base=0)
            poll = {"worker": "a", "queues": ["fenced"], "max": 1, "timeout": 5}
            first = a.request(Command.POLL, poll, 10).body
            assert (first["id"], first["attempt"]) == ([task_id], [1])
            # "a" stops heartbeating; the broker's reaper returns the task after its lease.
            second: dict[str, list[int]] = {"id": []}
            while not second["id"]:
                second = b.request(Command.POLL, {**poll, "worker": "b"}, 10).body
            assert (second["id"], second["attempt"]) == ([task_id], [2])
            complete = {"id": [task_id], "attempt": [1], "result": [b"from a"]}
            assert a.request(Command.COMPLETE, complete, 10).body["outcomes"] == ["stale"]
            heartbeat = {"worker": "a", "id": [task_id], "attempt": [1]}
            assert a.request(Command.HEARTBEAT, heartbeat, 10).body["outcomes"] == ["stale"]
            theirs = {"id": [task_id], "attempt": [2], "result": [b"from b"]}
            assert b.request(Command.COMPLETE, theirs, 10).body["outcomes"] == ["ok"]
            assert a.request(Command.COMPLETE, complete, 10).body["outcomes"] == ["finished"]
            assert client.result(task_id).result == b"from b"
    finally:
        a.close()
        b.close()
        ctx.term()


def test_broker_killed_and_restarted_loses_no_acknowledged_task(
    start_broker, processes, db, tmp_path
) -> None:
    port = int(start_broker().endpoint.rsplit(":", 1)[1])  # a port of our own, to restart on
    processes[-1].kill()
    broker = start_broker(port=port, broker_id="restarted")
    ledger = tmp_path / "ledger"
    spawn_worker(processes, broker.endpoint, ledger, concurrency=4)
    acknowledged: list[int] = []
    with Client(broker.endpoint, timeout=2.0) as client:
        for _ in range(20):
            acknowledged += client.submit_many(
                [TaskSpec("sleepy", b"0.05", lease_timeout=3.0) for _ in range(10)]
            )
        wait_for(lambda: len(ledger_runs(ledger)) >= 20, what="work under way")
        broker.kill()  # SIGKILL: buffered and running tasks are left behind
        start_broker(port=port, broker_id="restarted")  # a new epoch fences the old buffer
        for _ in range(5):
            acknowledged += client.submit_many(
                [TaskSpec("sleepy", b"0.01", lease_timeout=3.0) for _ in range(10)]
            )
        for task_id in acknowledged:
            assert client.result(task_id, timeout=90).state == "completed"
    results = db.query("SELECT id, state FROM results")
    assert sorted(i for i, _ in results) == sorted(acknowledged)
    assert {s for _, s in results} == {"completed"}
    runs = Counter(t for t, _, _ in ledger_runs(ledger))
    assert set(runs) == set(acknowledged)


def test_garbage_gets_errors_and_the_broker_keeps_serving(start_broker) -> None:
    broker = start_broker()
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(broker.endpoint)
    try:
        with Client(broker.endpoint) as client:
            garbage = [
                [b"\x00\xff" * 10],
                [b"conduit/0", b"PING", b"\x81\xa3rid\x01"],
                [PROTOCOL, b"PING", b"\xc1"],
                [PROTOCOL, b"NOPE", b"\x81\xa3rid\x02"],
                [PROTOCOL, b"SUBMIT", b"\x81\xa3rid\x03"],
                [PROTOCOL, b"POLL", b"\x91" * 5000 + b"\xc0"],
                [os.urandom(64), os.urandom(300), os.urandom(7)],
            ]
            for frames in garbage:
                rogue.send_multipart(frames)
                assert rogue.poll(5000), f"no reply to {frames!r:.60}"
                reply = rogue.recv_multipart()
                assert reply[0] == PROTOCOL and reply[1] == b"ERROR"
                assert client.ping() == "b1"
            # A conduit/1 peer is answered in conduit/1, with its rid, and nothing is written.
            old = {"rid": 4, "tasks": [{"queue": "old", "payload": b"x"}]}
            rogue.send_multipart([b"conduit/1", b"SUBMIT", msgpack.packb(old)])
            assert rogue.poll(5000), "no reply to a conduit/1 SUBMIT"
            version, command, body = rogue.recv_multipart()
            assert (version, command) == (b"conduit/1", b"ERROR")
            message = "this broker speaks conduit/2; the request was conduit/1"
            assert msgpack.unpackb(body) == {"rid": 4, "code": "bad_version", "message": message}
            with pytest.raises(BrokerError, match="invalid_task"):
                client.submit("no spaces allowed", b"x")
            # Over the size limit, ZeroMQ drops the sender's connection: no reply, no harm.
            rogue.send_multipart([PROTOCOL, b"SUBMIT", b"\x00" * (17 * 1024 * 1024)])
            task_id = client.submit("fine", b"still here")
            assert client.lookup([task_id])[0].state == "pending"
    finally:
        rogue.close()
        ctx.term()
    assert broker.proc.poll() is None


def random_garbage(rng: random.Random) -> list[bytes]:
    """One hostile message: noise, a wrong frame count, or a valid header over a bad body. Not
    PING, WORKERS or STATS: any map with a valid rid is a good one of those."""
    good_with_a_rid = (Command.PING, Command.WORKERS, Command.STATS)
    commands = [c.value.encode() for c in Command if c not in good_with_a_rid] + [b"", b"NOPE"]
    body = {
        rng.choice(["rid", "payload", "id", "attempt", "queues", "worker", "ids", "max"]): rng.choice(
            [None, -1, 2**64 - 1, 1.5, "x" * rng.randrange(300), b"\x00", [[1, "a"]], {"q": []}, [{}]]
        )
        for _ in range(rng.randrange(5))
    }
    raw = msgpack.packb(body)
    return rng.choice(
        [
            [os.urandom(rng.randrange(100)) for _ in range(rng.randrange(1, 6))],
            [PROTOCOL, rng.choice(commands), raw],
            [PROTOCOL, rng.choice(commands), raw[: rng.randrange(len(raw))]],
            [PROTOCOL, rng.choice(commands), raw + os.urandom(3)],
            [PROTOCOL, b"POLL", b"\x91" * rng.randrange(1, 20000) + b"\xc0"],
            [PROTOCOL, rng.choice(commands)],
        ]
    )


def test_random_garbage_from_many_peers_while_work_goes_on(start_broker, processes, db, tmp_path) -> None:
    """A broker answers every routable bad message with ERROR and keeps serving real work."""
    broker = start_broker()
    ledger = tmp_path / "ledger"
    spawn_worker(processes, broker.endpoint, ledger, concurrency=4)
    rng = random.Random(7)
    ctx = zmq.Context()
    rogues = [ctx.socket(zmq.DEALER) for _ in range(3)]
    submitted: list[int] = []

    def produce() -> None:
        with Client(broker.endpoint) as client:
            for i in range(200):
                submitted.append(client.submit("sleepy", b"0", key=f"g{i}"))

    try:
        for rogue in rogues:
            rogue.setsockopt(zmq.LINGER, 0)
            rogue.connect(broker.endpoint)
        producer = threading.Thread(target=produce)
        producer.start()
        for n in range(1500):
            rogue = rogues[n % 3]
            rogue.send_multipart(random_garbage(rng))
            assert rogue.poll(10_000), "a bad message went unanswered"
            reply = rogue.recv_multipart()
            assert reply[:2] == [PROTOCOL, b"ERROR"], reply
        producer.join(60)
        assert not producer.is_alive() and len(submitted) == 200
        with Client(broker.endpoint) as client:
            wait_for(lambda: all(i.state == "completed" for i in client.lookup(submitted)), what="completion")
    finally:
        for rogue in rogues:
            rogue.close()
        ctx.term()
    assert broker.proc.poll() is None
    assert sorted(t for t, _, _ in ledger_runs(ledger)) == sorted(submitted)


def test_sigterm_gives_the_buffer_back_and_exits_cleanly(start_broker, db) -> None:
    broker = start_broker()
    ctx = zmq.Context()
    worker = Channel(ctx, broker.endpoint)
    try:
        with Client(broker.endpoint) as client:
            client.submit_many([TaskSpec("buffered", b"x") for _ in range(20)])
            poll = {"worker": "w", "queues": ["buffered"], "max": 1, "timeout": 5}
            assert len(worker.request(Command.POLL, poll, 10).body["id"]) == 1
            # Delivered or not, all 20 are the broker's until it stops (a delivery costs no write).
            wait_for(lambda: db.query("SELECT count(*) FROM live_tasks WHERE state = 'buffered'") == [(20,)])
        assert broker.stop() == 0
    finally:
        worker.close()
        ctx.term()
    assert db.query("SELECT state, count(*) FROM live_tasks GROUP BY 1 ORDER BY 1") == [
        ("pending", 19),
        ("running", 1),
    ]
    assert db.query("SELECT count(*) FROM brokers WHERE expires_at > now()") == [(0,)]  # its lease ended
    assert "event=stopped" in broker.log()


def test_worker_and_client_move_past_an_unreachable_broker(start_broker, db) -> None:
    from conftest import free_port

    broker = start_broker()
    dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens here
    worker = Worker([dead, broker.endpoint], concurrency=1, poll_timeout=1.0)

    @worker.handler("q")
    def handle(task: TaskContext) -> bytes:
        return b"done"

    with Client([dead, broker.endpoint], timeout=1.0) as client, running(worker):
        task_id = client.submit("q", b"")  # never sent to the dead one: safe to move on, no key needed
        assert client.result(task_id, timeout=30).result == b"done"


def test_the_broker_truncates_a_bucket_its_tasks_have_left(start_broker, db) -> None:
    """No call from outside: the keeper's pass, about every second, finds the bucket drained."""
    broker = start_broker()
    worker = Worker(broker.endpoint, concurrency=4, poll_timeout=1.0)

    @worker.handler("echo")
    def echo(task: TaskContext) -> bytes:
        return task.payload

    size = "SELECT pg_relation_size('tasks_0')"
    with Client(broker.endpoint) as client, running(worker):
        ids = client.submit_batch("echo", [b"x%d" % i for i in range(500)])
        assert all(i >> 17 == 0 for i in ids)
        assert [client.result(i, timeout=30).state for i in ids] == ["completed"] * 500
        assert db.query(size)[0][0] > 0  # the bucket ids are taken from is left alone
        db.query("SELECT setval('task_ids', 3 << 17)")  # ids move on to bucket 3
        wait_for(lambda: db.query(size) == [(0,)], timeout=10, what="tasks_0 truncated")
        later = client.submit("echo", b"later")  # from the broker's block of ids: back in tasks_0
        assert later >> 17 == 0 and client.result(later, timeout=30).result == b"later"
