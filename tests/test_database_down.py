"""Database trouble, on real PostgreSQL: a server that stops and starts again, connections that are
dropped under a running broker. Submits during an outage are refused with a clear error, never
acknowledged; workers keep their work and retry their reports; everything resumes afterwards."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from chaos.pg import PrivatePostgres
from conftest import BrokerProcess, Database, Process, free_port
from test_e2e import ledger_runs, running, spawn_worker, wait_for

from conduit.client import Client, TaskContext, Worker
from conduit.client.channel import BrokerError, BrokerTimeout
from conduit.errors import ConduitError
from conduit.store import init_schema
from conduit.task import TaskSpec


@pytest.fixture
def private_pg() -> Iterator[tuple[PrivatePostgres, Database]]:
    """A PostgreSQL of this test's own, which it may stop: never the machine's shared server."""
    pg = PrivatePostgres()
    try:
        init_schema(pg.dsn, "conduit")
        yield pg, Database(pg.dsn, "conduit")
    finally:
        pg.close()


def _broker(db: Database, processes: list[Process], env: dict[str, str] | None = None) -> BrokerProcess:
    old = os.environ.copy()
    os.environ.update(env or {})  # BrokerProcess passes the environment on to the broker
    try:
        broker = BrokerProcess(db, free_port(), "b1")
    finally:
        os.environ.clear()
        os.environ.update(old)
    processes.append(broker)
    return broker


def test_database_stopped_then_back_submits_refused_work_kept_and_finished_once(
    private_pg, processes, tmp_path: Path
) -> None:
    pg, db = private_pg
    broker = _broker(db, processes)
    ledger = tmp_path / "ledger"
    worker = spawn_worker(processes, broker.endpoint, ledger, concurrency=1)
    with Client(broker.endpoint, timeout=5.0) as client:
        task_id = client.submit("sleepy", b"3.0", lease_timeout=30.0)
        # Running, not just delivered: a delivery that no heartbeat has turned into a task lease
        # yet is still buffered under the broker's epoch, which the outage fences (it runs again).
        wait_for(
            lambda: ledger_runs(ledger) and db.query("SELECT state FROM live_tasks") == [("running",)],
            what="the task to run under a task lease",
        )
        pg.stop("immediate")  # a crash: every connection is gone, nothing answers
        try:
            began = time.monotonic()
            with pytest.raises(ConduitError) as refused:
                client.submit("sleepy", b"0", key="during-outage")
            took = time.monotonic() - began
            assert "unavailable" in str(refused.value) and "database" in str(refused.value), refused.value
            assert took < 6.0  # refused, not left hanging
            # The handler ends while the database is down: its COMPLETE is refused and resent.
            wait_for(lambda: "report_deferred" in worker.log(), timeout=30, what="a deferred complete")
            time.sleep(2.0)
            assert broker.proc.poll() is None and worker.proc.poll() is None
        finally:
            pg.start()
        result = client.result(task_id, timeout=60)
        assert (result.state, result.attempt, result.result) == ("completed", 1, b"slept 1")
        assert [(t, a) for t, a, _ in ledger_runs(ledger)] == [(task_id, 1)]  # it ran once
        # Nothing of the refused submit was written; the same key now makes one task.
        assert db.query("SELECT count(*) FROM idempotency_keys WHERE key = 'during-outage'") == [(0,)]
        again = client.submit("sleepy", b"0", key="during-outage")
        assert client.result(again, timeout=60).state == "completed"
    assert broker.proc.poll() is None  # it rode out the outage
    assert db.query("SELECT count(*) FROM results WHERE state = 'completed'") == [(2,)]


def test_broker_survives_its_database_connections_being_dropped(db, processes) -> None:
    """Regression: a failed broker-lease renewal logged a field twice and crashed the broker."""
    appname = f"conduit-test-{uuid.uuid4().hex[:8]}"
    broker = _broker(db, processes, {"PGAPPNAME": appname})
    with Client(broker.endpoint, timeout=5.0) as client:
        client.submit("idle", b"")
        for _ in range(3):  # each round breaks the keeper's connection under a lease renewal
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                    (appname,),
                )
            time.sleep(1.5)  # past a renewal (every lease-term/3 = 1 s)
            assert broker.proc.poll() is None, broker.log()[-3000:]
        wait_for(lambda: "broker_lease_lost" in broker.log(), timeout=10, what="a failed renewal")
        # It serves again once it has connected anew.
        deadline = time.monotonic() + 30
        while True:
            try:
                assert client.lookup([client.submit("idle", b"")])[0].state == "pending"
                break
            except (BrokerError, BrokerTimeout):
                assert time.monotonic() < deadline
                time.sleep(0.5)
    assert broker.proc.poll() is None


def test_broker_refuses_to_start_without_its_database(private_pg, processes) -> None:
    pg, db = private_pg
    pg.stop()
    try:
        broker = Process(["broker", "--bind", f"tcp://127.0.0.1:{free_port()}", "--dsn", db.dsn])
        processes.append(broker)
        assert broker.proc.wait(30) != 0
        assert "cannot connect to PostgreSQL" in broker.log()
    finally:
        pg.start()


class CommitThenDrop:
    """A TCP proxy in front of PostgreSQL that, once armed, lets the next statement containing
    `marker` that changes rows commit, then closes the connection before the client hears that
    it is done (ReadyForQuery): a commit whose outcome the client cannot know."""

    def __init__(self, dsn: str, marker: bytes) -> None:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        host, port = str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)
        self.target: tuple[int, Any] = (
            (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
            if host.startswith("/")
            else (socket.AF_INET, (host, port))
        )
        self.marker = marker
        self.armed = threading.Event()
        self.dropped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.dsn = psycopg.conninfo.make_conninfo(
            dsn,
            host="127.0.0.1",
            port=str(self.listener.getsockname()[1]),
            sslmode="disable",
            gssencmode="disable",
        )
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(self.target[0], socket.SOCK_STREAM)
            server.connect(self.target[1])
            state = {"names": set(), "pending": False, "drop": False}
            threading.Thread(target=self._pump_up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(server, client, state), daemon=True).start()

    @staticmethod
    def _messages(sock: socket.socket, typed: bool) -> Iterator[tuple[bytes, bytes]]:
        """(type, whole message) from a PostgreSQL stream; the first client message is untyped."""
        buf = b""
        while True:
            head = 5 if typed else 4
            while len(buf) >= head:
                length = int.from_bytes(buf[head - 4 : head], "big")
                end = head - 4 + length
                if len(buf) < end:
                    break
                yield (buf[:1] if typed else b""), buf[:end]
                buf, typed = buf[end:], True
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data

    def _pump_up(self, client: socket.socket, server: socket.socket, state: dict[str, Any]) -> None:
        for kind, msg in self._messages(client, typed=False):
            if kind == b"P" and self.marker in msg:  # Parse: statement name, then its text
                state["names"].add(msg[5:].split(b"\0", 1)[0])
                state["pending"] = True
            elif kind == b"B":  # Bind: portal name, then the statement's
                state["pending"] = msg[5:].split(b"\0", 2)[1] in state["names"]
            elif kind == b"Q":
                state["pending"] = self.marker in msg
            try:
                server.sendall(msg)
            except OSError:
                return

    def _pump_down(self, server: socket.socket, client: socket.socket, state: dict[str, Any]) -> None:
        for kind, msg in self._messages(server, typed=True):
            if kind == b"C" and state["pending"] and self.armed.is_set():
                tag = msg[5:].rstrip(b"\0").split()
                state["drop"] = tag[0] in (b"UPDATE", b"SELECT") and int(tag[-1]) > 0
            if kind == b"Z" and state["drop"]:  # committed: the client never hears it
                self.armed.clear()
                self.dropped.set()
                for sock in (client, server):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                        sock.close()
                return
            try:
                client.sendall(msg)
            except OSError:
                return


def test_a_lease_whose_commit_was_not_heard_strands_nothing(db, processes) -> None:
    """Regression: when the connection died after the lease statement committed, the tasks
    stayed buffered under the broker's live epoch, which nobody reaps, while the broker, having
    heard an error, never had them: lost until the broker restarted."""
    proxy = CommitThenDrop(db.dsn, b"attempt = t.attempt + 1")
    try:
        broker = _broker(Database(proxy.dsn, db.schema), processes)
        worker = Worker(broker.endpoint, concurrency=4, poll_timeout=1.0)

        @worker.handler("stranded")
        def handle(task: TaskContext) -> bytes:
            return b"done"

        with Client(broker.endpoint, timeout=5.0) as client:
            ids = client.submit_many([TaskSpec("stranded", b"") for _ in range(20)])  # nobody polls yet
            proxy.armed.set()
            with running(worker):
                wait_for(proxy.dropped.is_set, timeout=15, what="a lease committed and its reply lost")
                for task_id in ids:
                    assert client.result(task_id, timeout=30).state == "completed"
        assert broker.proc.poll() is None
    finally:
        proxy.close()
