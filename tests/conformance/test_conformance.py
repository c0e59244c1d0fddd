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

import pytest
from conftest import Process
from test_e2e import ledger_runs, wait_for

from conduit.client import Client
from conduit.task import TaskSpec

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


def test_lease_expiry_and_redelivery(impl, start_broker, spawn, db, ledger) -> None:
    """A worker killed mid-task stops heartbeating; after the lease the task runs again, once."""
    broker = start_broker()
    first = spawn(impl, [broker.endpoint])
    with Client(broker.endpoint) as client:
        task_id = client.submit("sleepy", b"1.0", lease_timeout=2.0, backoff_base=0)
        wait_for(lambda: ledger_runs(ledger), what="the first run")
        first.kill()  # SIGKILL mid-task: no complete, no more heartbeats
        killed_at = time.monotonic()
        second = spawn(impl, [broker.endpoint])
        result = client.result(task_id, timeout=60)
    assert time.monotonic() - killed_at >= 1.0  # not before the lease could expire
    assert (result.state, result.attempt, result.result) == ("completed", 2, b"slept 2")
    (_, _, pid1), (_, _, pid2) = ledger_runs(ledger)
    assert [(t, a) for t, a, _ in ledger_runs(ledger)] == [(task_id, 1), (task_id, 2)]
    assert (pid1, pid2) == (first.proc.pid, second.proc.pid)
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
            lambda: db.query("SELECT state FROM tasks WHERE id = %s", (long_id,)) == [("running",)],
            what="the task's first heartbeat",
        )
    ((holder,),) = db.query("SELECT broker FROM tasks WHERE id = %s", (long_id,))  # heartbeats go here
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


def test_graceful_stop_releases_prefetched_tasks(impl, start_broker, spawn, db, ledger) -> None:
    """SIGTERM: the running task finishes and is reported, prefetched ones are released (not
    left to expire, no failure counted), and the process exits 0."""
    broker = start_broker()
    worker = spawn(impl, [broker.endpoint], concurrency="1", prefetch="5")
    with Client(broker.endpoint) as client:
        busy = client.submit("sleepy", b"2.0")
        wait_for(lambda: ledger_runs(ledger), what="the first run")
        # The worker polls for 5 more while it runs one: these go to it and wait, prefetched.
        ids = client.submit_many([TaskSpec("echo", b"later", lease_timeout=30) for _ in range(5)])
        time.sleep(0.5)
        assert worker.stop() == 0
        assert client.result(busy, timeout=5).state == "completed"
        assert [t for t, _, _ in ledger_runs(ledger)] == [busy]
        # Released, they are pending again at once (a broker with recent polls may buffer them
        # again): a new worker runs them now, not after their 30 s leases.
        began = time.monotonic()
        spawn(impl, [broker.endpoint])
        assert all(client.result(i, timeout=20).state == "completed" for i in ids)
        assert time.monotonic() - began < 10
    assert db.query("SELECT DISTINCT failures FROM results WHERE id = ANY(%s)", (ids,)) == [(0,)]


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
