"""/metrics of a broker and of a worker, scraped over HTTP and read with prometheus_client's own
parser after a known workload; STATS through the Client; bad --metrics values."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from test_e2e import wait_for
from test_worker_cli import conduit_worker, project

from conduit.broker.metrics import BrokerMetrics
from conduit.client import AsyncClient, Client, Worker, task_ref
from conduit.client.link import dealer
from conduit.client.metrics import WorkerMetrics
from conduit.wire import REPLIES, Command, decode, encode


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics: name -> {sorted labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples: dict[str, Any], name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(tuple(sorted(labels.items())))


class Raw:
    """A bare DEALER, to send reports a Worker never would (stale, for a cancelled task...)."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = dealer(self.ctx, endpoint)
        self.rid = 0

    def ask(self, command: Command, **body: Any) -> dict[str, Any]:
        self.rid += 1
        self.sock.send_multipart(encode(command, {"rid": self.rid, **body}))
        assert self.sock.poll(10_000), f"no reply to {command}"
        msg = decode(self.sock.recv_multipart(), allowed=REPLIES)
        assert msg.rid == self.rid, msg
        return msg.body

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class Threads:
    """Workers run in this process, each stopped at teardown whatever happens."""

    def __init__(self) -> None:
        self.started: list[tuple[Worker, threading.Thread]] = []

    def start(self, worker: Worker) -> None:
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        self.started.append((worker, thread))


@pytest.fixture
def worker_thread() -> Iterator[Threads]:
    threads = Threads()
    yield threads
    for worker, thread in threads.started:
        worker.stop()
        thread.join(30)


def test_broker_metrics_count_a_known_workload(start_broker, worker_thread) -> None:
    port = free_port()
    broker = start_broker("--metrics", f"127.0.0.1:{port}")
    assert f"event=metrics_serving url=http://127.0.0.1:{port}/metrics" in broker.log()
    worker = Worker(broker.endpoint, concurrency=4, poll_timeout=1.0)

    @worker.handler("ok")
    def ok(task: Any) -> bytes:
        return b"done"

    @worker.handler("bad")
    def bad(task: Any) -> None:
        raise ValueError("always")

    worker_thread.start(worker)
    raw = Raw(broker.endpoint)
    try:
        with Client(broker.endpoint) as client:
            done = client.submit_batch("ok", [b"%d" % i for i in range(30)])
            dead = client.submit_batch("bad", [b"x"] * 4, max_attempts=2, backoff_base=0)
            for task_id in done + dead:
                client.result(task_id, timeout=30)
            # A raw worker takes two tasks, then sends the four refusals and one accepted completion.
            ids = client.submit_batch("raw", [b"r1", b"r2"])
            got = raw.ask(Command.POLL, worker="raw", queues=["raw"], max=2, timeout=5)
            while len(got["id"]) < 2:
                more = raw.ask(Command.POLL, worker="raw", queues=["raw"], max=1, timeout=5)
                got = {k: got[k] + more[k] for k in ("id", "attempt")}
            attempt = dict(zip(got["id"], got["attempt"], strict=True))
            assert client.cancel(ids[1])
            refused = raw.ask(
                Command.COMPLETE,
                id=[ids[0], ids[1], done[0], 2**62],
                attempt=[attempt[ids[0]] + 1, attempt[ids[1]], 1, 1],
            )
            assert refused["outcomes"] == ["stale", "cancelled", "finished", "unknown"]
            accepted = raw.ask(Command.COMPLETE, id=[ids[0]], attempt=[attempt[ids[0]]], elapsed=[100.0])
            assert accepted["outcomes"] == ["ok"]
    finally:
        raw.close()

    expected = {
        "submitted": {"ok": 30, "bad": 4, "raw": 2},
        "delivered": {"ok": 30, "bad": 8, "raw": 2},  # each bad task ran twice
        "completed": {"ok": 30, "bad": 0, "raw": 1},
        "failed": {"ok": 0, "bad": 8, "raw": 0},
        "dead": {"ok": 0, "bad": 4, "raw": 0},
    }
    depths = {("ok", "completed"): 30, ("bad", "dead"): 4, ("raw", "completed"): 1, ("raw", "cancelled"): 1}

    def counted() -> dict[str, Any] | None:
        s = scrape(port)
        for key, by_queue in expected.items():
            for queue, n in by_queue.items():
                if value(s, f"conduit_tasks_{key}_total", queue=queue) != n:
                    return None
        for (queue, state), n in depths.items():  # the keeper reads the counters every 5 s
            if value(s, "conduit_queue_depth", queue=queue, state=state) != n:
                return None
        return s if value(s, "conduit_waiting_polls", queue="ok") == 1 else None  # the idle worker's

    wait_for(counted, timeout=20, what="the workload's counts in /metrics")
    s = counted()
    assert s is not None
    for reason in ("stale", "finished", "cancelled", "unknown"):
        assert value(s, "conduit_refused_total", reason=reason) == 1, reason
    for queue in ("ok", "bad", "raw"):
        assert value(s, "conduit_buffered_tasks", queue=queue) == 0
        count = value(s, "conduit_task_start_latency_seconds_count", queue=queue)
        assert count == expected["delivered"][queue], queue  # every delivery timed once
        assert value(s, "conduit_task_start_latency_seconds_bucket", queue=queue, le="+Inf") == count
        assert (value(s, "conduit_task_start_latency_seconds_sum", queue=queue) or 0) > 0
    assert value(s, "conduit_queue_depth", queue="raw", state="pending") is None  # nothing left
    # Runs the Worker reported (30 completed, 8 failed) and the raw one's 100 s.
    assert value(s, "conduit_task_run_seconds_count") == 39
    assert (value(s, "conduit_task_run_seconds_sum") or 0) >= 100
    assert value(s, "conduit_task_run_seconds_bucket", le="60.0") == 38  # the Worker's take ~nothing
    commits = value(s, "conduit_commit_seconds_count")
    assert commits and commits == value(s, "conduit_commit_batch_size_count")
    assert (value(s, "conduit_commit_batch_size_sum") or 0) >= 4  # at least the raw requests
    assert value(s, "conduit_broker_lease_valid") == 1
    assert value(s, "conduit_database_errors_total") == 0

    worker.stop()  # its last poll is answered at its timeout: none waits then
    wait_for(lambda: value(scrape(port), "conduit_waiting_polls", queue="ok") == 0, 15, "no poll waiting")


def test_stats_from_every_broker(start_broker, worker_thread) -> None:
    broker = start_broker(broker_id="stats-1")
    other = start_broker(broker_id="stats-2")
    worker = Worker(broker.endpoint, concurrency=2, poll_timeout=1.0)

    @worker.handler("s")
    def handle(task: Any) -> None:
        if task.payload == b"fail":
            raise ValueError("no")

    worker_thread.start(worker)
    with Client([broker.endpoint, other.endpoint]) as client:
        ids = client.submit_batch("s", [b"a"] * 10 + [b"fail"], max_attempts=1)
        for task_id in ids:
            client.result(task_id, timeout=30)
        client.submit_batch("idle", [b"x"] * 3)  # nobody polls it: pending, not buffered

        def mine() -> Any:
            stats = {s.broker: s for s in client.stats()}
            s = stats["stats-1"].queues.get("s")
            return stats if s is not None and (s.completed, s.dead, s.polls) == (10, 1, 1) else None

        wait_for(mine, timeout=10, what="STATS counting the workload")
        stats = mine()
        assert set(stats) == {"stats-1", "stats-2"}  # one object per broker
    one = stats["stats-1"]
    assert one.endpoint == broker.endpoint and one.lease_valid and isinstance(one.epoch, int)
    q = one.queues["s"]
    assert (q.delivered, q.completed, q.failed, q.dead) == (11, 10, 1, 1)
    assert q.buffered == 0 and q.polls == 1
    assert q.latency_p50 is not None and q.latency_p99 is not None
    assert 0 <= q.latency_p50 <= q.latency_p99 < 30
    submitted = sum(s.queues["s"].submitted for s in stats.values() if "s" in s.queues)
    assert submitted == 11  # wherever the client sent them
    idle = [s.queues["idle"] for s in stats.values() if "idle" in s.queues]
    assert sum(i.submitted for i in idle) == 3 and all(i.delivered == 0 for i in idle)
    assert all(i.latency_p50 is None for i in idle)  # nothing delivered in the last minute

    async def asynchronously() -> list[str]:
        async with AsyncClient(broker.endpoint) as aio:
            return [s.broker for s in await aio.stats()]

    assert asyncio.run(asynchronously()) == ["stats-1"]


APP_SLOW = """
import os
import time
from pathlib import Path

from conduit.client import Worker, task

worker = Worker(os.environ["BROKER"], concurrency=2, poll_timeout=1.0, heartbeat_interval=0.5)


@task
def fine(x: int) -> int:
    return x


@task(max_attempts=1)
def boom() -> None:
    raise ValueError("boom")


@task
def wait_for_file(path: str) -> None:
    while not Path(path).exists():
        time.sleep(0.02)


worker.register(fine, boom, wait_for_file)
"""


def test_worker_metrics(start_broker, processes, tmp_path: Path) -> None:
    broker = start_broker()
    port = free_port()
    worker = conduit_worker(
        processes, project(tmp_path, APP_SLOW), broker.endpoint, "--metrics", f"127.0.0.1:{port}"
    )
    release = tmp_path / "go"
    with Client(broker.endpoint) as client:
        fine = [client.submit(task_ref("fine"), i) for i in range(5)]
        boom = client.submit(task_ref("boom", max_attempts=1))
        for handle in fine:
            assert handle.result(timeout=30) in range(5)
        assert client.result(boom.id, timeout=30).state == "dead"
        slow = client.submit(task_ref("wait_for_file"), str(release))
        wait_for(
            lambda: value(scrape(port), "conduit_worker_tasks_running") == 1, 15, "the slow task running"
        )
        release.touch()
        assert client.result(slow.id, timeout=30).state == "completed"
    assert f"event=metrics_serving url=http://127.0.0.1:{port}/metrics" in worker.log()

    def settled() -> dict[str, Any] | None:
        s = scrape(port)
        return s if value(s, "conduit_worker_tasks_run_total", queue="wait_for_file") == 1 else None

    wait_for(settled, 10, "the slow run counted")
    s = settled()
    assert s is not None
    assert value(s, "conduit_worker_tasks_run_total", queue="fine") == 5
    assert value(s, "conduit_worker_tasks_failed_total", queue="fine") == 0
    assert value(s, "conduit_worker_tasks_run_total", queue="boom") == 1
    assert value(s, "conduit_worker_tasks_failed_total", queue="boom") == 1
    assert value(s, "conduit_worker_task_run_seconds_count", queue="fine") == 5
    assert (value(s, "conduit_worker_task_run_seconds_sum", queue="wait_for_file") or 0) > 0.02
    assert value(s, "conduit_worker_tasks_running") == 0
    assert value(s, "conduit_worker_tasks_prefetched") == 0


@pytest.mark.parametrize("command", ["broker", "worker"])
def test_bad_metrics_addresses_are_one_line_errors(command: str, db, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "conduit", command]
    if command == "broker":
        base += ["--bind", "tcp://127.0.0.1:0", "--dsn", db.dsn, "--schema", db.schema]
    else:
        base += ["myapp.tasks:worker", "--connect", "tcp://127.0.0.1:1"]
        project(tmp_path)
    env = {**os.environ, "BROKER": "tcp://127.0.0.1:1"}

    def run(address: str) -> subprocess.CompletedProcess[str]:
        args = [*base, "--metrics", address]
        return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)

    for bad in ("127.0.0.1", "localhost:99999", "http://x:1"):
        done = run(bad)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("Error: Invalid value for '--metrics': metrics address"), line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run(f"127.0.0.1:{port}")  # refused at once: it would otherwise serve until stopped
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line == f"Error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"


def test_the_docs_and_the_dashboard_name_exactly_the_metrics_served() -> None:
    docs = Path(__file__).parent.parent / "docs"
    families = [*BrokerMetrics().collect(), *WorkerMetrics().collect()]
    shown = {f"{f.name}_total" if f.type == "counter" else f.name for f in families}
    documented = set(re.findall(r"^\| `(conduit_\w+)`", (docs / "METRICS.md").read_text(), re.M))
    assert documented == shown
    dashboard = json.loads((docs / "grafana-conduit.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"conduit_\w+", e)}
    assert used == shown  # every metric on a panel, and nothing else
