"""Conformance: the same scenarios against every worker implementation, as real processes.

The Python Worker (conduit.client.Worker, via `conduit worker`) and the Node.js reference worker
(clients/node, written from docs/PROTOCOL.md alone) run the same handlers (handlers.py and
clients/node/test/conformance-worker.js); tasks are submitted and results read with the Python
Client, and the database is the ground truth. Node tests skip when node or clients/node's
node_modules are missing, unless CONDUIT_REQUIRE_NODE=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from conftest import Process, free_port
from test_client import OLD_REFUSAL, FakeBroker
from test_e2e import ledger_runs, run_starts, wait_for
from test_metrics import scrape, value

from conduit.client import Client
from conduit.client.mesh import Mesh
from conduit.task import TaskSpec
from conduit.wire import PROTOCOL

HERE = Path(__file__).parent
NODE_DIR = HERE.parent.parent / "clients" / "node"
IMPLEMENTATIONS = ["python", "node"]


def node_missing() -> str | None:
    """Why the Node worker cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "zeromq").is_dir():
        return f"run `npm ci --prefix {NODE_DIR}` first (no node_modules)"
    return None


def require(impl: str) -> None:
    reason = node_missing() if impl == "node" else None
    if reason and os.environ.get("CONDUIT_REQUIRE_NODE") == "1":
        pytest.fail(f"CONDUIT_REQUIRE_NODE=1 but the Node worker cannot run: {reason}")
    if reason:
        pytest.skip(reason)


def worker_process(impl: str, endpoints: list[str], ledger: Path, **settings: str) -> Process:
    """A worker of either implementation as a process running the conformance handlers; the
    `processes` fixture stops it whatever happens."""
    env = {
        "CONDUIT_TEST_ENDPOINT": " ".join(endpoints),
        "CONDUIT_TEST_LEDGER": str(ledger),
        **{f"CONDUIT_TEST_{k.upper()}": v for k, v in settings.items()},
    }
    if impl == "python":
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
        return Process(["worker", "handlers:worker"], env)
    return Process([str(NODE_DIR / "test" / "conformance-worker.js")], env, program=["node"])


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> str:
    require(request.param)
    return str(request.param)


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


@pytest.fixture
def spawn(processes: list, ledger: Path) -> Callable[..., Process]:
    def start(impl: str, endpoints: list[str], **settings: str) -> Process:
        worker = worker_process(impl, endpoints, ledger, **settings)
        processes.append(worker)
        return worker

    return start


@pytest.fixture
def fake_broker() -> Iterator[Callable[..., FakeBroker]]:
    """Stand-ins for brokers (test_client.FakeBroker), closed after the test."""
    ctx = zmq.Context()
    fakes: list[FakeBroker] = []

    def make(answer: Callable[[list[bytes]], list[bytes] | None] = lambda _: OLD_REFUSAL) -> FakeBroker:
        fakes.append(FakeBroker(ctx, answer))
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.close()
    ctx.term()


def lease_expiry(db: Any, task_id: int) -> float | None:
    """When the task's lease expires (epoch seconds, database clock), once a heartbeat made one."""
    rows = db.query("SELECT extract(epoch FROM lease_expires_at) FROM tasks WHERE id = %s", (task_id,))
    return float(rows[0][0]) if rows and rows[0][0] is not None else None  # type: ignore[arg-type]


@contextmanager
def logs_on_failure(*procs: Any) -> Iterator[None]:
    """Print the processes' logs when the block fails: what a flaky run in CI needs to be read."""
    try:
        yield
    except BaseException:
        for proc in procs:
            print(f"--- {' '.join(proc.proc.args)[-80:]}\n{proc.log()[-4000:]}")
        raise


def test_result_round_trip(impl, start_broker, spawn, db, ledger) -> None:
    """Payloads reach the handler byte for byte, results come back byte for byte, nil included."""
    broker = start_broker()
    worker = spawn(impl, [broker.endpoint])
    payloads = [b"", b"hello", bytes(range(256)), b"\x00" * 17, os.urandom(200_000), "ünï €".encode()]
    with Client(broker.endpoint) as client:
        ids = client.submit_many([TaskSpec("echo", p) for p in payloads])
        who = client.submit("whoami", b"")
        nothing = client.submit("noop", b"")
        assert [client.result(i, timeout=30).result for i in ids] == payloads
        assert client.result(who, timeout=30).result == f"{impl} b1 1".encode()
        done = client.result(nothing, timeout=30)
        assert (done.state, done.result) == ("completed", None)
    assert worker.stop() == 0
    assert db.query("SELECT count(*) FROM tasks") == [(0,)]
    assert db.query("SELECT DISTINCT state, attempt, failures FROM results") == [("completed", 1, 0)]


def test_retry_then_success_and_permanent_failure(impl, start_broker, spawn, db, ledger) -> None:
    """A thrown error is a FAIL with retry; the retry succeeds. A permanent error is dead at once."""
    broker = start_broker()
    worker = spawn(impl, [broker.endpoint])
    with Client(broker.endpoint) as client:
        flaky = client.submit("flaky", b"", backoff_base=0.05)
        doomed = client.submit("doomed", b"", max_attempts=5)
        done = client.result(flaky, timeout=30)
        assert (done.state, done.attempt, done.result) == ("completed", 2, b"ok after 1 failure(s)")
        dead = client.result(doomed, timeout=30)
        assert dead.state == "dead" and "doomed: cannot be done" in (dead.error or "")
    assert worker.stop() == 0
    assert db.query(
        "SELECT failures, last_error LIKE '%%flaky: first try fails%%' FROM results WHERE id = %s", (flaky,)
    ) == [(1, True)]
    assert db.query("SELECT failures, attempt FROM results WHERE id = %s", (doomed,)) == [(1, 1)]
    assert sorted((t, a) for t, a, _ in ledger_runs(ledger)) == [(flaky, 1), (flaky, 2), (doomed, 1)]


def test_reports_carry_each_runs_seconds(impl, start_broker, spawn) -> None:
    """COMPLETE and FAIL carry the seconds each run took (elapsed), which the broker's metrics show."""
    port = free_port()
    broker = start_broker("--metrics", f"127.0.0.1:{port}")
    spawn(impl, [broker.endpoint])
    with Client(broker.endpoint) as client:
        slept = client.submit("sleepy", b"0.3")
        doomed = client.submit("doomed", b"")
        assert client.result(slept, timeout=30).state == "completed"
        assert client.result(doomed, timeout=30).state == "dead"

    def runs() -> float | None:
        return value(scrape(port), "conduit_task_run_seconds_count")

    wait_for(lambda: runs() == 2, timeout=10, what="both runs timed")
    samples = scrape(port)
    assert 0.3 <= (value(samples, "conduit_task_run_seconds_sum") or 0) < 30
    assert (value(samples, "conduit_task_run_seconds_bucket", le="0.2") or 0) <= 1  # not the sleepy one


def test_lease_expiry_and_redelivery(impl, start_broker, spawn, db, ledger) -> None:
    """A worker killed mid-task stops heartbeating; after the lease the task runs again, once, and
    not before that lease could have expired."""
    broker = start_broker()
    first = spawn(impl, [broker.endpoint])
    with Client(broker.endpoint) as client:
        task_id = client.submit("sleepy", b"2.0", lease_timeout=2.0, backoff_base=0)
        wait_for(lambda: ledger_runs(ledger) and lease_expiry(db, task_id), what="the first run, leased")
        expires = lease_expiry(db, task_id)  # read before the kill: a later heartbeat only extends it
        assert expires is not None
        first.kill()  # SIGKILL mid-task: no complete, no more heartbeats
        second = spawn(impl, [broker.endpoint])
        result = client.result(task_id, timeout=60)
    assert (result.state, result.attempt, result.result) == ("completed", 2, b"slept 2")
    (_, _, pid1), (_, _, pid2) = ledger_runs(ledger)
    assert [(t, a) for t, a, _ in ledger_runs(ledger)] == [(task_id, 1), (task_id, 2)]
    assert (pid1, pid2) == (first.proc.pid, second.proc.pid)
    assert run_starts(ledger)[(task_id, 2)] >= expires  # the rerun began once the lease had lapsed
    assert db.query("SELECT failures FROM results WHERE id = %s", (task_id,)) == [(1,)]
    assert second.stop() == 0


def test_refused_stale_completion(impl, start_broker, spawn, db, ledger) -> None:
    """A worker paused past its lease (SIGSTOP) finishes late: the broker refuses its result
    (`stale`), the worker drops it without retrying, and the redelivery's result is the one kept."""
    broker = start_broker()
    paused = spawn(impl, [broker.endpoint])
    with Client(broker.endpoint) as client:
        task_id = client.submit("sleepy", b"3.0", lease_timeout=2.0, backoff_base=0)
        wait_for(lambda: ledger_runs(ledger), what="the first run")
        paused.proc.send_signal(signal.SIGSTOP)  # its poll times out empty; its lease lapses
        try:
            other = spawn(impl, [broker.endpoint])
            wait_for(lambda: len(ledger_runs(ledger)) == 2, timeout=30, what="the redelivery")
        finally:
            paused.proc.send_signal(signal.SIGCONT)  # its handler is done by now: it reports late
        wait_for(lambda: "outcome=stale" in paused.log(), timeout=15, what="the stale refusal")
        result = client.result(task_id, timeout=30)
        with logs_on_failure(broker, paused, other):
            later = client.submit("echo", b"still working")  # the refused worker carries on
        assert client.result(later, timeout=30).result == b"still working"
    assert (result.state, result.attempt, result.result) == ("completed", 2, b"slept 2")
    assert [(t, a, p) for t, a, p in ledger_runs(ledger) if t == task_id] == [
        (task_id, 1, paused.proc.pid),
        (task_id, 2, other.proc.pid),
    ]
    assert db.query("SELECT state, failures FROM results WHERE id = %s", (task_id,)) == [("completed", 1)]
    assert paused.stop() == 0 and other.stop() == 0  # nothing left unacknowledged: no retry loop
    assert paused.log().count("event=refused command=COMPLETE") <= 1  # refused once, not resent


def test_broker_failover(impl, start_broker, spawn, db, ledger) -> None:
    """Two brokers with gossip; the broker the worker talks to is SIGKILLed mid-task. The task
    keeps its lease through the other broker and completes once; work submitted there is done."""
    brokers = {b: start_broker("--pub", "tcp://127.0.0.1:*", broker_id=b) for b in ("b1", "b2")}
    # No prefetch: the worker does not poll (so does not move) while the long task runs.
    worker = spawn(impl, [brokers["b1"].endpoint, brokers["b2"].endpoint], concurrency="1", prefetch="0")
    with Client(brokers["b1"].endpoint, retry_submits=False) as client:
        long_id = client.submit("sleepy", b"3.0", lease_timeout=3.0)
        wait_for(
            lambda: db.query("SELECT state FROM live_tasks WHERE id = %s", (long_id,)) == [("running",)],
            what="the task's first heartbeat",
        )
    ((holder,),) = db.query("SELECT broker FROM live_tasks WHERE id = %s", (long_id,))  # heartbeats go here
    (survivor,) = {"b1", "b2"} - {holder}
    brokers[holder].kill()
    with (
        logs_on_failure(worker, brokers[survivor]),
        Client(brokers[survivor].endpoint, retry_submits=False) as client,
    ):
        ids = client.submit_many([TaskSpec("whoami", b"") for _ in range(20)])
        assert {client.result(i, timeout=30).result for i in ids} == {f"{impl} {survivor} 1".encode()}
        done = client.result(long_id, timeout=30)
    assert (done.state, done.attempt, done.result) == ("completed", 1, b"slept 1")
    assert [a for t, a, _ in ledger_runs(ledger) if t == long_id] == [1]  # it ran once
    assert "event=failover" in worker.log()
    assert worker.stop() == 0


# Liveness (docs/PROTOCOL.md §11): a worker waiting on a broker leaves it after two liveness
# intervals of silence (1 s each), and at once when its connection drops or the broker answers
# shutting_down. Its poll timeout is 10 s here, so a worker that waited for an unanswered poll to
# be lost (10 s + 5 s) would fail the bounds for a killed or paused broker many times over. Each
# bound runs from the fault to what the product promises: a run's start in the ledger, or a task
# lease renewed through the other broker in the database; never a process start-up.
LIVENESS = 1.0


def two_brokers(start_broker) -> dict[str, Any]:
    """Two brokers that gossip, so the worker knows both and learns when one is stopping."""
    return {b: start_broker("--pub", "tcp://127.0.0.1:*", broker_id=b) for b in ("b1", "b2")}


def polled(brokers: dict[str, Any], queue: str) -> str:
    """The broker whose gossip shows a poll waiting on `queue`: the one the worker waits on."""
    ctx = zmq.Context()
    mesh = Mesh(ctx, [], [b.pub for b in brokers.values()])
    found: list[str] = []

    def look() -> list[str]:
        mesh.update()
        found[:] = [v.broker for v in mesh.live() if v.polls([queue])]
        return found

    try:
        wait_for(look, timeout=15, what=f"a poll waiting on {queue}")
    finally:
        mesh.close()
        ctx.term()
    return found[0]


def first_start(ledger: Path, ids: list[int]) -> float:
    starts = run_starts(ledger)
    return min(t for (task, _), t in starts.items() if task in ids)


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_dead_or_stopping_broker_is_left_at_once(impl, fault, start_broker, spawn, db, ledger) -> None:
    """SIGKILL: the connection drops, and the worker gets work from the other broker within 2 s.
    SIGTERM while the worker polls it: its poll is answered empty (or refused, shutting_down) and
    GOSSIP says stopping, so the worker moves within 1 s."""
    brokers = two_brokers(start_broker)
    worker = spawn(impl, [brokers["b1"].endpoint, brokers["b2"].endpoint], poll_timeout="10")
    waited_on = polled(brokers, "whoami")
    (other,) = set(brokers) - {waited_on}
    with logs_on_failure(worker, *brokers.values()), Client(brokers[other].endpoint) as client:
        client.ping()  # connected before the fault: the submit below takes milliseconds
        faulted_at = time.time()
        if fault == "kill":
            brokers[waited_on].kill()
        else:
            brokers[waited_on].proc.send_signal(signal.SIGTERM)
        ids = client.submit_many([TaskSpec("whoami", b"") for _ in range(5)])
        assert {client.result(i, timeout=30).result for i in ids} == {f"{impl} {other} 1".encode()}
        moved = first_start(ledger, ids) - faulted_at
        bound = 2.0 if fault == "kill" else 1.0
        assert moved < bound, f"work from {other} began {moved:.2f}s after the {fault}"
        if fault == "stop":
            assert brokers[waited_on].proc.wait(10) == 0
    assert worker.proc.poll() is None  # still at work (a stop would wait out its 10 s poll)


@pytest.mark.parametrize("waiting_for", ["poll", "heartbeat"])
def test_a_paused_broker_is_left_within_two_liveness_intervals(
    impl, waiting_for, start_broker, spawn, db, ledger, tmp_path: Path
) -> None:
    """SIGSTOP the broker the worker waits on. Its connection stays up, so only silence shows it:
    the worker PINGs it after one liveness interval and leaves it after two. Waiting on a poll, it
    starts work from the other broker within ~3 s of the pause. Running a task with no room to
    poll, it waits only on the ACK of each heartbeat (every 2.5 s, the default): the first one
    unanswered begins the wait, so it renews the lease through the other broker within one
    heartbeat and two liveness intervals (two missed heartbeats would take 5 to 7.5 s), and the
    task completes once, attempt 1, though the paused broker never answers again."""
    brokers = two_brokers(start_broker)
    endpoints = [brokers["b1"].endpoint, brokers["b2"].endpoint]
    heartbeat = 2.5
    settings = {"concurrency": "1", "prefetch": "0", "heartbeat": str(heartbeat)}
    worker = spawn(impl, endpoints, poll_timeout="10", **(settings if waiting_for == "heartbeat" else {}))
    waited_on = polled(brokers, "whoami")
    (other,) = set(brokers) - {waited_on}
    long_id = None
    gate = tmp_path / "gate"  # the long task runs until this exists
    if waiting_for == "heartbeat":  # submitted where the worker polls: it runs there, heartbeated there
        with Client(brokers[waited_on].endpoint) as client:
            # The lease outlasts the worst case below: renewed at most a heartbeat before the pause.
            long_id = client.submit("gated", str(gate).encode(), lease_timeout=8.0)
        wait_for(lambda: lease_expiry(db, long_id) and ledger_runs(ledger), what="the long task running")

    def renewed_elsewhere() -> bool:
        return db.query("SELECT broker FROM live_tasks WHERE id = %s", (long_id,)) == [(other,)]

    try:
        with logs_on_failure(worker, *brokers.values()), Client(brokers[other].endpoint) as client:
            client.ping()
            paused_at = time.time()
            brokers[waited_on].proc.send_signal(signal.SIGSTOP)
            if long_id is not None:
                wait_for(renewed_elsewhere, timeout=10, what=f"a lease renewal through {other}")
                moved = time.time() - paused_at  # at worst the next heartbeat, 2 intervals, a commit
                assert moved < heartbeat + 2 * LIVENESS + 1.0, f"the lease moved {moved:.2f}s after the pause"
                gate.touch()
                done = client.result(long_id, timeout=30)
                assert (done.state, done.attempt, done.result) == ("completed", 1, b"opened 1")
                assert [a for t, a, _ in ledger_runs(ledger) if t == long_id] == [1]  # it ran once
            ids = client.submit_many([TaskSpec("whoami", b"") for _ in range(5)])
            assert {client.result(i, timeout=30).result for i in ids} == {f"{impl} {other} 1".encode()}
            if long_id is None:
                moved = first_start(ledger, ids) - paused_at  # two intervals, then a poll elsewhere
                assert moved < 2 * LIVENESS + 1.0, f"work from {other} began {moved:.2f}s after the pause"
            assert "event=failover" in worker.log()
    finally:
        brokers[waited_on].kill()  # never resumed: whatever it holds is the others' to take over
    assert worker.proc.poll() is None


def test_graceful_stop_releases_prefetched_tasks(impl, start_broker, spawn, db, ledger) -> None:
    """SIGTERM: the running task finishes and is reported, prefetched ones are released (not
    run, not left to expire, no failure counted), and the process exits 0."""
    broker = start_broker()
    worker = spawn(impl, [broker.endpoint], concurrency="1", prefetch="5")
    with Client(broker.endpoint) as client:
        busy = client.submit("sleepy", b"3.0")
        wait_for(lambda: ledger_runs(ledger), what="the first run")
        # The worker polls for 5 more while it runs one: these go to it and wait, prefetched. Its
        # heartbeats cover what it holds, so once all 5 are running in the database it holds them.
        ids = client.submit_many([TaskSpec("echo", b"later", lease_timeout=30) for _ in range(5)])
        held = "SELECT count(*) FROM live_tasks WHERE id = ANY(%s) AND state = 'running' AND attempt = 1"
        wait_for(lambda: db.query(held, (ids,)) == [(5,)], timeout=10, what="the 5 tasks prefetched")
        assert [t for t, _, _ in ledger_runs(ledger)] == [busy]  # held, not started: one runs at a time
        assert worker.stop() == 0
        assert client.result(busy, timeout=5).state == "completed"
        assert [t for t, _, _ in ledger_runs(ledger)] == [busy]  # the prefetched ones never ran
        # Released: pending again at once, no failure counted (a broker with recent polls may
        # buffer them again), where a lease left to expire would be running for 30 s more.
        released = db.query("SELECT state, failures FROM live_tasks WHERE id = ANY(%s)", (ids,))
        assert len(released) == 5 and all(state != "running" and f == 0 for state, f in released)
        spawn(impl, [broker.endpoint])
        assert all(client.result(i, timeout=20).state == "completed" for i in ids)
    assert db.query("SELECT DISTINCT failures FROM results WHERE id = ANY(%s)", (ids,)) == [(0,)]
    assert all(a >= 2 for (a,) in db.query("SELECT attempt FROM results WHERE id = ANY(%s)", (ids,)))


def test_python_and_node_workers_share_a_queue(start_broker, spawn, db, ledger) -> None:
    """The mixed setup of the README: Python submits, Node and Python workers both take tasks."""
    require("node")
    broker = start_broker()
    workers = [spawn(impl, [broker.endpoint]) for impl in IMPLEMENTATIONS]
    with Client(broker.endpoint) as client:
        for _ in range(20):  # trickle, so that both workers are polling when tasks come
            ids = client.submit_many([TaskSpec("whoami", b"") for _ in range(10)])
            for i in ids:
                assert client.result(i, timeout=30).state == "completed"
            if len({r[:6] for (r,) in db.query("SELECT result FROM results")}) == 2:
                break
    languages = {bytes(r).split()[0] for (r,) in db.query("SELECT result FROM results")}
    assert languages == {b"python", b"node"}
    assert all(w.stop() == 0 for w in workers)


def test_a_broker_of_another_version_is_told_once_and_left(
    impl, start_broker, spawn, fake_broker, db
) -> None:
    """A conduit/1 broker first in the list refuses everything (in its own framing): the worker
    logs it once, naming both versions, and works through the next broker."""
    old = fake_broker()
    broker = start_broker()
    worker = spawn(impl, [old.endpoint, broker.endpoint])
    with Client(broker.endpoint) as client, logs_on_failure(worker):
        ids = client.submit_many([TaskSpec("echo", b"%d" % i) for i in range(20)])
        assert [client.result(i, timeout=30).result for i in ids] == [b"%d" % i for i in range(20)]
        time.sleep(2.5)  # empty polls rotate through the endpoints: the old one refuses again
    assert worker.stop() == 0
    told = [line for line in worker.log().splitlines() if "bad_version" in line]
    assert len(told) == 1, told
    assert "the broker speaks conduit/1; this peer speaks conduit/2" in told[0] and old.endpoint in told[0]
    assert len(old.received) >= 2  # refused more than once, told once


def test_the_discovery_ping_is_repeated_until_answered(impl, start_broker, spawn, fake_broker) -> None:
    """A configured broker that has not answered the PING asking for its gossip endpoint is asked
    again every heartbeat interval (0.5 s here), and no more once it answers."""
    answering = False

    def pong(frames: list[bytes]) -> list[bytes] | None:
        rid = msgpack.unpackb(frames[2])["rid"]
        return (
            [PROTOCOL, b"PONG", msgpack.packb({"rid": rid, "broker": "fake", "pub": None})]
            if answering
            else None
        )

    fake = fake_broker(pong)
    broker = start_broker("--pub", "tcp://127.0.0.1:*")
    # A long poll: the worker hears the real broker's gossip before its first empty DELIVER, and
    # so never polls the fake, which gets only the discovery PINGs.
    worker = spawn(impl, [broker.endpoint, fake.endpoint], poll_timeout="5")
    with logs_on_failure(worker):
        wait_for(lambda: fake.commands().count(b"PING") >= 3, timeout=10, what="the PING asked again")
        answering = True
        wait_for(lambda: fake.answered, what="an answered PING")
        asked = len(fake.received)
        time.sleep(1.5)
        assert len(fake.received) <= asked + 1  # one may have crossed the answer on its way
        assert set(fake.commands()) == {b"PING"}
        gaps = [b[0] - a[0] for a, b in zip(fake.received, fake.received[1:], strict=False)][:3]
        assert all(0.3 < gap < 1.5 for gap in gaps), gaps  # about one heartbeat interval apart
    assert worker.stop() == 0
