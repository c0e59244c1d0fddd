"""Everyday operations end to end, on a real broker, worker and PostgreSQL: the `conduit tasks`,
`queues`, `workers` and `db url` commands (--json and text, exit codes), and the same operations
on the Client. After each one that moves tasks, the counters equal the rows."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time

from conftest import Database
from test_e2e import running, wait_for
from test_store_ops import truth

from conduit.client import Client, PermanentError, TaskContext, Worker
from conduit.client.client import WorkerSeen
from conduit.store.queries import SCHEMA_VERSION


def conduit(db: Database, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "conduit", *args]
    if args[0] != "workers" or "--connect" not in args:
        command += ["--dsn", db.dsn, "--schema", db.schema]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)


def ok(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def counts(db: Database) -> dict:
    return ok(conduit(db, "queues", "--json"))["queues"]


def test_tasks_list_show_cancel_and_retry(start_broker, db) -> None:
    broker = start_broker()
    release = threading.Event()
    worker = Worker(broker.endpoint, concurrency=1, poll_timeout=1.0, worker_id="ops-worker")

    @worker.handler("ops")
    def handle(task: TaskContext) -> bytes:
        if task.payload == b"bad":
            raise PermanentError("bad payload")
        if task.payload == b"slow":
            release.wait(120)  # until the test sets it: long enough for a busy machine
        return task.payload.upper()

    with Client(broker.endpoint) as client, running(worker):
        done = client.submit("ops", b"fine")
        dead = client.submit("ops", b"bad")
        assert client.result(done, timeout=20).state == "completed"
        assert client.result(dead, timeout=20).state == "dead"
        slow = client.submit("ops", b"slow")
        wait_for(lambda: client.lookup([slow])[0].state == "running", what="the slow task to run")
        later = [client.submit("ops", b"later %d" % i, delay=3600) for i in range(3)]

        # list: live tasks by id; pending in run order, paged; finished newest first
        live = ok(conduit(db, "tasks", "list", "--queue", "ops", "--json"))
        assert [(t["id"], t["state"]) for t in live["tasks"]] == [(slow, "running")] + [
            (i, "pending") for i in later
        ]
        assert live["tasks"][0]["broker"] == "b1" and live["next"] is None
        first = ok(conduit(db, "tasks", "list", "--state", "pending", "--limit", "2", "--json"))
        assert [t["id"] for t in first["tasks"]] == later[:2] and first["next"]
        rest = ok(
            conduit(
                db, "tasks", "list", "--state", "pending", "--limit", "2", "--after", first["next"], "--json"
            )
        )
        assert [t["id"] for t in rest["tasks"]] == later[2:] and rest["next"] is None
        text = conduit(db, "tasks", "list", "--state", "pending", "--limit", "2")
        assert text.returncode == 0 and f"more: --after {first['next']}" in text.stderr
        assert [line.split()[0] for line in text.stdout.splitlines()[1:]] == [str(i) for i in later[:2]]
        finished = ok(conduit(db, "tasks", "list", "--state", "dead", "--json"))["tasks"]
        assert [t["id"] for t in finished] == [dead] and "bad payload" in finished[0]["error"]
        assert (
            ok(conduit(db, "tasks", "list", "--state", "completed", "--older-than", "1h", "--json"))["tasks"]
            == []
        )

        # show: everything kept, payload and result as text
        (shown,) = ok(conduit(db, "tasks", "show", str(done), "--json"))["tasks"]
        assert (shown["state"], shown["result"], shown["attempt"]) == ("completed", "FINE", 1)
        (pending,) = ok(conduit(db, "tasks", "show", str(later[0]), "--json"))["tasks"]
        assert (pending["payload"], pending["max_attempts"], pending["lease_timeout"]) == ("later 0", 5, 30.0)
        text = conduit(db, "tasks", "show", str(dead))
        assert (
            text.returncode == 0 and "state:            dead" in text.stdout and "bad payload" in text.stdout
        )
        unknown = conduit(db, "tasks", "show", str(done), "999999999")
        assert (
            unknown.returncode == 1
            and unknown.stderr == "Error: no task 999999999 (never submitted, or pruned)\n"
        )

        # cancel: a running task and a pending one; an ended one is refused, exit 1
        before = counts(db)["ops"]
        out = conduit(db, "tasks", "cancel", str(slow), str(later[0]), str(done), "--json")
        assert out.returncode == 1
        assert json.loads(out.stdout)["outcomes"] == {
            str(slow): "ok",
            str(later[0]): "ok",
            str(done): "finished",
        }
        after = counts(db)["ops"]
        assert (after["running"], after["pending"], after["cancelled"]) == (
            before["running"] - 1,
            before["pending"] - 1,
            before["cancelled"] + 2,
        )
        release.set()  # the handler finishes; its result is refused, the task stays cancelled
        time.sleep(1.0)
        assert client.lookup([slow])[0].state == "cancelled"
        assert counts(db) == {q: {s: c.get(s, 0) for s in after} for q, c in truth(db).items()}

        # retry: dead and cancelled back to pending (text form), a live one refused
        text = conduit(db, "tasks", "retry", str(dead), str(slow), str(later[1]))
        assert text.returncode == 1
        assert text.stdout.splitlines() == [
            f"{dead} retried",
            f"{slow} retried",
            f"{later[1]} not retried: live",
        ]
        assert client.result(slow, timeout=20).state == "completed"  # run again, to the end this time
        assert client.result(dead, timeout=20).state == "dead"  # it fails for good again
        assert counts(db)["ops"] == {s: truth(db)["ops"].get(s, 0) for s in counts(db)["ops"]}


def test_queues_depths_redrive_and_purge(start_broker, db) -> None:
    broker = start_broker()
    worker = Worker(broker.endpoint, concurrency=2, poll_timeout=1.0)

    @worker.handler("flaky")
    def fail(task: TaskContext) -> bytes:
        if task.payload.startswith(b"die"):
            raise PermanentError("no")
        return b"ok"

    with Client(broker.endpoint) as client:
        with running(worker):
            ids = [client.submit("flaky", b"die %d" % i) for i in range(3)]
            for i in ids:
                assert client.result(i, timeout=20).state == "dead"
        backlog = client.submit_batch("backlog", [b"%d" % i for i in range(25)])
        assert ok(conduit(db, "queues", "--json"))["queues"] == {
            "flaky": {"pending": 0, "buffered": 0, "running": 0, "completed": 0, "dead": 3, "cancelled": 0},
            "backlog": {
                "pending": 25,
                "buffered": 0,
                "running": 0,
                "completed": 0,
                "dead": 0,
                "cancelled": 0,
            },
        }
        table = conduit(db, "queues").stdout.splitlines()
        assert table[0].split() == ["queue", "waiting", "running", "completed", "dead", "cancelled", "paused"]
        assert table[1].split() == ["backlog", "25", "0", "0", "0", "0"]

        assert ok(conduit(db, "queues", "redrive", "flaky", "--json")) == {"queue": "flaky", "redriven": 3}
        assert counts(db)["flaky"]["pending"] == 3 == truth(db)["flaky"]["pending"]
        assert conduit(db, "queues", "redrive", "flaky").stdout == "0 dead tasks of flaky back to pending\n"

        # purge asks first: no (or no answer) purges nothing and exits 1; yes, or --yes, purges
        refused = conduit(db, "queues", "purge", "backlog", stdin="n\n")
        assert refused.returncode == 1 and "Cancel the 25 tasks of backlog" in refused.stderr
        assert refused.stderr.rstrip().endswith("nothing purged") and counts(db)["backlog"]["pending"] == 25
        assert conduit(db, "queues", "purge", "backlog", stdin="").returncode == 1
        agreed = conduit(db, "queues", "purge", "backlog", stdin="y\n")
        assert agreed.returncode == 0 and agreed.stdout == "25 tasks of backlog cancelled\n"
        assert ok(conduit(db, "queues", "purge", "flaky", "--yes", "--json")) == {
            "queue": "flaky",
            "purged": 3,
        }
        assert [r.state for r in client.lookup(backlog[:2])] == ["cancelled", "cancelled"]
        assert ok(conduit(db, "queues", "--json"))["queues"]["backlog"]["cancelled"] == 25
        assert {q: {s: n for s, n in c.items() if n} for q, c in counts(db).items()} == truth(db)


def test_workers_and_the_clients_operations(start_broker, db) -> None:
    broker = start_broker()
    gate = threading.Event()
    worker = Worker(
        broker.endpoint,
        concurrency=1,
        prefetch=1,
        poll_timeout=1.0,
        heartbeat_interval=0.5,
        worker_id="w-ops",
    )

    @worker.handler("hold")
    def hold(task: TaskContext) -> None:
        gate.wait(120)

    with Client(broker.endpoint) as client, running(worker):
        held = client.submit("hold", b"x")
        wait_for(lambda: client.lookup([held])[0].state == "running", what="the task to run")
        waiting = client.submit("hold", b"z")  # prefetched behind it: the worker runs one at a time

        def mine() -> list[WorkerSeen]:
            return [w for w in client.workers() if w.worker == "w-ops"]

        # Python: who polls, what it holds (running, prefetched), when it was last heard
        wait_for(lambda: [(w.holding, w.running) for w in mine()] == [(2, 1)], what="a heartbeat of both")
        (seen,) = mine()
        assert (seen.broker, seen.endpoint, seen.queues, seen.prefetched) == (
            "b1",
            broker.endpoint,
            ["hold"],
            1,
        )
        assert (seen.host, seen.pid, seen.concurrency) == (socket.gethostname(), os.getpid(), 1)
        assert seen.heard < 3.0
        out = ok(conduit(db, "workers", "--json"))["workers"]
        (row,) = [w for w in out if w["worker"] == "w-ops"]
        assert (row["broker"], row["queues"], row["holding"], row["pid"]) == ("b1", ["hold"], 2, os.getpid())
        assert (row["running"], row["prefetched"]) == (1, 1)
        text = conduit(db, "workers", "--connect", broker.endpoint)
        assert text.returncode == 0 and text.stdout.splitlines()[0].split()[-3:] == ["heard", "host", "pid"]
        line = text.stdout.splitlines()[1].split()
        assert line[:3] == ["w-ops", "b1", "hold"] and line[-2:] == [socket.gethostname(), str(os.getpid())]
        assert line[4:7] == ["2", "1", "1"]  # holding, of them running, and its concurrency
        # the Client's cancel and retry, through the broker
        pending = client.submit("idle", b"y")
        assert client.cancel_many([pending, held, 10**12]) == ["ok", "ok", "unknown"]
        assert client.retry([pending, held, 10**12]) == ["ok", "ok", "unknown"]
        assert client.retry([pending]) == ["live"]
        gate.set()
        assert client.result(held, timeout=20).state == "completed"  # retried, it ran to the end
        assert client.result(waiting, timeout=20).state == "completed"
        assert counts(db)["idle"]["pending"] == 1 == truth(db)["idle"]["pending"]


def test_workers_without_a_broker_is_a_one_line_error(db) -> None:
    proc = conduit(db, "workers")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "Error: no live broker in the database: start one, or name brokers with --connect\n"


def test_db_url_prints_a_dsn_and_a_psql_line_that_works(db) -> None:
    out = ok(conduit(db, "db", "url", "--json"))
    assert (out["dsn"], out["schema"], out["embedded"]) == (db.dsn, db.schema, False)
    text = conduit(db, "db", "url")
    dsn, psql = text.stdout.splitlines()
    assert dsn == db.dsn and psql == out["psql"]
    ran = subprocess.run(
        f"{psql} -Atc 'SELECT value FROM meta WHERE key = $$schema_version$$'",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (ran.returncode, ran.stdout) == (0, f"{SCHEMA_VERSION}\n"), ran.stderr


def test_db_url_of_the_embedded_server_names_its_user(tmp_path) -> None:
    """The embedded server's user is postgres: the printed line logs in as it, from any user."""
    data = tmp_path / "pgdata"
    env = {"CONDUIT_DATA_DIR": str(data)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "conduit", "db", "url", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )
        out = ok(proc)
        assert out["embedded"] and "postgres@" in out["dsn"].replace("postgres:@", "postgres@")
        ran = subprocess.run(
            f"{out['psql']} -Atc 'SELECT current_user'",
            shell=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (ran.returncode, ran.stdout) == (0, "postgres\n"), ran.stderr
        assert shlex.split(out["psql"])[1] == "psql"
    finally:
        subprocess.run(
            [sys.executable, "-m", "conduit", "db", "stop", "--force", "--data-dir", str(data)],
            capture_output=True,
            timeout=60,
        )
