"""The mesh under test: brokers and workers as real processes on loopback, one PostgreSQL; or,
with a `Network` (tests/netns), each on a host of its own: brokers b1..bN on broker hosts bound to
every interface and advertised at their host's address, workers spread over the worker hosts,
PostgreSQL through the proxy on the database network.

Every process is started here and remembered by pid, so faults hit only what the harness owns
and everything is stopped at the end whatever happened. Processes connect to PostgreSQL with an
application_name of their own (PGAPPNAME), so dropping "our" connections never touches anyone
else's on a shared server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from netns.hosts import Network
from psycopg import sql

from conduit.store import init_schema

TESTS = Path(__file__).resolve().parent.parent

# An append-only audit of every task that finishes, into `history` or a `completions` batch: a task
# finished twice (even through a detour back to pending) shows as two rows here, whatever the
# history holds at the end.
AUDIT = """
CREATE TABLE chaos_audit (
    id bigint NOT NULL, state text NOT NULL, attempt integer NOT NULL, result bytea,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION chaos_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'history' THEN
        INSERT INTO chaos_audit (id, state, attempt, result) SELECT id, state, attempt, result FROM new_rows;
    ELSE
        INSERT INTO chaos_audit (id, state, attempt, result)
        SELECT u.id, 'completed', coalesce(u.attempt, 1), u.result  -- no attempts: every one 1
        FROM new_rows c, unnest(c.ids, c.attempts, c.results) AS u(id, attempt, result);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER history_chaos_audit AFTER INSERT ON history
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chaos_audit();
CREATE TRIGGER completions_chaos_audit AFTER INSERT ON completions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION chaos_audit();
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int | None:
    """Resident set size of a live process, from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class Member:
    """One broker or worker slot: restarted in place (same id and ports) after a kill."""

    role: str
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    host: str | None = None  # the Network host it runs on (None: this machine, loopback)
    proc: subprocess.Popen[str] | None = None
    killed: bool = False  # the harness killed it on purpose; an exit otherwise is unexpected
    paused: bool = False
    pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """Brokers b1..bN (each with a gossip endpoint) and worker processes, on `dsn`/`schema`."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        folder: Path,
        *,
        brokers: int = 3,
        workers: int = 3,
        concurrency: int = 4,
        queues: tuple[str, ...] = ("chaos.a", "chaos.b"),
        lease_term: float = 3.0,
        net: Network | None = None,
        broker_dsn: str | None = None,
    ) -> None:
        """`net`: run on its hosts; brokers then reach the database at `broker_dsn` (its proxy)."""
        self.dsn, self.schema, self.folder, self.net = dsn, schema, folder, net
        self.appname = f"conduit-chaos-{uuid.uuid4().hex[:8]}"
        self.ledger_dir = folder / "ledger"
        self.ledger_dir.mkdir(parents=True, exist_ok=True)
        self.queues = queues
        self.lock = threading.RLock()
        self.unexpected_exits: list[tuple[float, str, int, int | None]] = []
        names = [f"b{i + 1}" for i in range(brokers)]
        if net is None:
            ports = [(free_port(), free_port()) for _ in range(brokers)]
            self.endpoints = [f"tcp://127.0.0.1:{p}" for p, _ in ports]
            binds = [
                ["--bind", f"tcp://127.0.0.1:{port}", "--pub", f"tcp://127.0.0.1:{pub}"]
                for port, pub in ports
            ]
        else:
            self.endpoints = [f"tcp://{net.host(n).address}:5555" for n in names]
            binds = [net.broker_options(n) for n in names]
        base_env = {**os.environ, "PGAPPNAME": self.appname, "PYTHONPATH": str(TESTS)}
        self.brokers = [
            Member(
                "broker",
                name,
                [
                    "broker",
                    *bind,
                    *("--broker-id", name, "--lease-term", str(lease_term)),
                    *("--dsn", broker_dsn or dsn, "--schema", schema),
                ],
                base_env,
                folder / f"{name}.log",
                host=name if net else None,
            )
            for name, bind in zip(names, binds, strict=True)
        ]
        worker_env = {
            **base_env,
            "CHAOS_ENDPOINTS": " ".join(self.endpoints),
            "CHAOS_LEDGER_DIR": str(self.ledger_dir),
            "CHAOS_CONCURRENCY": str(concurrency),
            "CHAOS_QUEUES": " ".join(queues),
        }
        self.workers = []
        for i in range(workers):
            # Each worker starts on a different broker (its first endpoint) and finds the rest.
            order = self.endpoints[i % brokers :] + self.endpoints[: i % brokers]
            env = {**worker_env, "CHAOS_ENDPOINTS": " ".join(order)}
            hosts = net.names("w") if net else [""]
            self.workers.append(
                Member(
                    "worker",
                    f"w{i + 1}",
                    ["worker", "chaos.handlers:worker"],
                    env,
                    folder / f"w{i + 1}.log",
                    host=hosts[i % len(hosts)] or None,
                )
            )

    @staticmethod
    def prepare(dsn: str, schema: str) -> None:
        """Conduit's schema plus the audit trigger, in a schema of the run's own."""
        init_schema(dsn, schema)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            conn.execute(AUDIT.encode())

    def members(self) -> list[Member]:
        return [*self.brokers, *self.workers]

    def start_all(self) -> None:
        for member in self.members():
            self.start(member)

    def start(self, member: Member, attempts: int = 60) -> None:
        """Start (or restart) a member; a broker is up once it printed its endpoint. A broker
        cannot start while the database is away, so keep trying for a while."""
        with self.lock:
            for _ in range(attempts):
                log = member.log.open("a")
                where = (
                    ["ip", "netns", "exec", self.net.host(member.host).ns] if self.net and member.host else []
                )
                proc = subprocess.Popen(  # `ip netns exec` execs: the pid is the program's
                    [*where, sys.executable, "-m", "conduit", *member.args],
                    stdout=subprocess.PIPE if member.role == "broker" else subprocess.DEVNULL,
                    stderr=log,
                    text=True,
                    env=member.env,
                )
                log.close()
                if member.role == "broker":
                    assert proc.stdout is not None
                    line = proc.stdout.readline().strip()
                    proc.stdout.readline()  # its gossip endpoint: a pipe closed before it kills it
                    proc.stdout.close()
                    if not line:
                        proc.wait(10)
                        time.sleep(0.5)
                        continue
                member.proc, member.killed, member.paused = proc, False, False
                member.pids.append(proc.pid)
                return
            raise RuntimeError(f"{member.name} would not start; see {member.log}")

    def kill(self, member: Member) -> int:
        with self.lock:
            pid = member.pid
            member.killed = True
            if member.paused:
                os.kill(pid, signal.SIGCONT)
            if member.alive():
                member.proc.kill()  # type: ignore[union-attr]
            member.proc.wait(10)  # type: ignore[union-attr]
            member.paused = False
            return pid

    def pause(self, member: Member) -> int:
        with self.lock:
            member.paused = True
            os.kill(member.pid, signal.SIGSTOP)
            return member.pid

    def resume(self, member: Member) -> None:
        with self.lock:
            if member.paused and member.alive():
                os.kill(member.pid, signal.SIGCONT)
            member.paused = False

    def check_alive(self) -> None:
        """Note and replace any member that exited without being killed: a crash under faults."""
        with self.lock:
            for member in self.members():
                if member.proc is not None and not member.killed and member.proc.poll() is not None:
                    self.unexpected_exits.append(
                        (time.time(), member.name, member.pid, member.proc.returncode)
                    )
                    member.killed = True  # counted once, even if the restart below fails
                    self.start(member)

    def broker_rss_kb(self) -> dict[str, int]:
        with self.lock:
            return {m.name: kb for m in self.brokers if m.alive() and (kb := rss_kb(m.pid)) is not None}

    def stop_all(self, timeout: float = 60) -> dict[str, int | None]:
        """SIGTERM everyone (workers first, so their last reports reach a broker), then SIGKILL
        whatever is left. Returns each member's exit code."""
        codes: dict[str, int | None] = {}
        with self.lock:
            for group in (self.workers, self.brokers):
                for m in group:
                    if m.alive():
                        if m.paused:
                            os.kill(m.pid, signal.SIGCONT)
                        m.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                deadline = time.monotonic() + timeout
                for m in group:
                    if m.proc is None:
                        continue
                    try:
                        codes[m.name] = m.proc.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        m.proc.kill()
                        m.proc.wait(10)
                        codes[m.name] = None  # did not stop on SIGTERM
        return codes

    def kill_all(self) -> None:
        """Last resort at exit: nothing the harness started may outlive it."""
        for m in self.members():
            if m.proc is not None and m.proc.poll() is None:
                try:
                    os.kill(m.pid, signal.SIGCONT)
                    m.proc.kill()
                    m.proc.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass

    def connect(self, appname_suffix: str) -> psycopg.Connection[Any]:
        """A connection of the harness's own (not one that the connection-drop fault hits)."""
        conn = psycopg.connect(
            self.dsn, autocommit=True, connect_timeout=5, application_name=f"{self.appname}-{appname_suffix}"
        )
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn
