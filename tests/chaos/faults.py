"""The fault scheduler: seeded, so a run's schedule (which fault, whom, for how long) repeats
with its seed. Every fault is recorded with its time window, so the checker can tell whether a
re-execution has a cause. On hosts in network namespaces (--netns) it also partitions the
network: links cut (`Network.cut`) or the database's traffic held by its proxy, each healed after
a random time."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from netns.pgproxy import PgProxy

from chaos.cluster import Cluster, Member
from chaos.load import LEASE_TIMEOUT
from chaos.pg import PrivatePostgres

KINDS = (
    "broker_kill",
    "broker_pause",
    "worker_kill",
    "worker_pause",
    "db_terminate",
    "pg_restart",
    "pg_pause",
    "long_transaction",
)
# Partitions, on a Network only: a broker cut off from its workers and clients (not from the
# database), a worker host from every broker for longer than a task lease, the client host
# mid-submit, the database from one broker (through the proxy), and one way only.
PARTITIONS = ("broker_isolate", "worker_host_cut", "client_cut", "db_cut", "db_oneway")


@dataclass
class Fault:
    kind: str
    target: str
    start: float  # wall clock, as the ledger
    end: float = 0.0  # when the fault was over (process back, server up, transaction closed)
    pids: list[int] = field(default_factory=list)  # processes it hit
    detail: str = ""


class Scheduler(threading.Thread):
    """Injects one fault at a time (a long transaction runs beside the others), every kind once in
    a shuffled first round, then at random, with a pause between faults."""

    def __init__(
        self,
        cluster: Cluster,
        rng: random.Random,
        *,
        postgres: PrivatePostgres | None,
        proxy: PgProxy | None = None,
        gap: tuple[float, float] = (1.0, 4.0),
        progress: Callable[[str], None] = lambda _: None,
    ) -> None:
        """`proxy`: the database's, when the cluster runs on a Network (partitions too)."""
        super().__init__(name="faults", daemon=True)
        self.cluster = cluster
        self.proxy = proxy
        self.rng = rng
        self.postgres = postgres
        self.gap = gap
        self.progress = progress
        own_server = ("pg_restart", "pg_pause")  # never done to a shared server
        kinds = KINDS + (PARTITIONS if cluster.net is not None and proxy is not None else ())
        self.kinds = [k for k in kinds if k not in own_server or postgres is not None]
        self.skipped = [k for k in KINDS if k not in self.kinds]
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self.missed: Counter[str] = Counter()  # injections that hit nothing, so were not faults
        self._halt = threading.Event()
        self._txn_threads: list[threading.Thread] = []

    def stop(self) -> None:
        """Finish the fault in progress (process restarted, server up), inject no more."""
        self._halt.set()
        self.join(120)
        for thread in self._txn_threads:
            thread.join(120)

    def run(self) -> None:
        first = list(self.kinds)
        self.rng.shuffle(first)
        while not self._halt.wait(self.rng.uniform(*self.gap)):
            from_first = bool(first)
            kind = first.pop(0) if first else self.rng.choice(self.kinds)
            try:
                fault = getattr(self, kind)()
            except Exception as exc:
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                continue
            if fault is None:  # it hit nothing: not a fault; the first round tries it again later
                self.missed[kind] += 1
                if from_first:
                    first.append(kind)
                continue
            self.faults.append(fault)
            self.progress(f"fault {kind} {fault.target} {fault.detail}".rstrip())

    def counts(self) -> dict[str, int]:
        return {k: sum(f.kind == k for f in self.faults) for k in self.kinds}

    # The faults. Durations straddle the interesting limits: the brokers' 3 s lease term and the
    # tasks' lease timeout, so some pauses outlive a lease and some do not.
    def broker_kill(self) -> Fault:
        return kill(
            self.cluster, "broker_kill", self.rng.choice(self.cluster.brokers), self.rng.uniform(0.2, 3.0)
        )

    def broker_pause(self) -> Fault:
        return pause(
            self.cluster, "broker_pause", self.rng.choice(self.cluster.brokers), self.rng.uniform(0.5, 6.0)
        )

    def worker_kill(self) -> Fault:
        return kill(
            self.cluster, "worker_kill", self.rng.choice(self.cluster.workers), self.rng.uniform(0.2, 2.0)
        )

    def worker_pause(self) -> Fault:
        return pause(
            self.cluster, "worker_pause", self.rng.choice(self.cluster.workers), self.rng.uniform(0.5, 9.0)
        )

    def db_terminate(self) -> Fault | None:
        """Drop the mesh's database connections (ours only, by application_name): all of them,
        or one at random, so that one thread of one broker loses its connection alone. None if
        no connection was there to drop (the brokers were reconnecting): nothing was injected."""
        which = self.rng.choice(["all", "one"])
        fault = Fault("db_terminate", which, time.time())
        with self.cluster.connect("faults") as conn:
            pids = [
                pid
                for (pid,) in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
                    (self.cluster.appname,),
                )
            ]
            if which == "one" and pids:
                pids = [self.rng.choice(pids)]
            ended = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(p)) FROM unnest(%s::int[]) p", (pids,)
            )
            (hit,) = ended.fetchone()  # type: ignore[misc]
        if not hit:
            return None
        fault.detail = f"{hit} backends"
        fault.end = time.time()
        return fault

    def pg_restart(self) -> Fault:
        """Stop PostgreSQL (a crash or a fast shutdown), keep it down a while, start it again."""
        assert self.postgres is not None
        mode = self.rng.choice(["immediate", "fast"])
        down = self.rng.uniform(0.5, 5.0)
        fault = Fault("pg_restart", mode, time.time(), detail=f"down {down:.1f}s")
        self.postgres.stop(mode)
        time.sleep(down)
        self.postgres.start()
        fault.end = time.time()
        return fault

    def pg_pause(self) -> Fault:
        """SIGSTOP every PostgreSQL process: connections hang instead of failing; SIGCONT after."""
        assert self.postgres is not None
        seconds = self.rng.uniform(0.5, 5.0)
        fault = Fault("pg_pause", "server", time.time(), detail=f"stopped {seconds:.1f}s")
        pids = self.postgres.pause()
        try:
            time.sleep(seconds)
        finally:
            self.postgres.resume(pids)
        fault.end = time.time()
        return fault

    def long_transaction(self) -> Fault:
        """Hold a snapshot open (vacuum cannot clean behind it) while other faults go on."""
        hold = self.rng.uniform(5.0, 30.0)
        fault = Fault("long_transaction", "snapshot", time.time(), detail=f"held {hold:.1f}s")

        def hold_open() -> None:
            try:
                with self.cluster.connect("long-txn") as conn, conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    conn.execute("SELECT count(*) FROM tasks").fetchone()
                    conn.execute("SELECT txid_current()")
                    self._halt.wait(hold)
            except psycopg.Error as exc:  # a server restart ends it early: that is fine
                fault.detail += f" (ended early: {str(exc).splitlines()[0][:60]})"
            fault.end = time.time()

        thread = threading.Thread(target=hold_open, name="long-txn", daemon=True)
        self._txn_threads.append(thread)
        thread.start()
        return fault

    def broker_isolate(self) -> Fault:
        """The seed's corner case, for real: alive, its database reachable, its peers not."""
        broker = self.rng.choice(self.cluster.brokers)
        return self._cut("broker_isolate", broker.name, "mesh", self.rng.uniform(1.0, 8.0), [broker])

    def worker_host_cut(self) -> Fault:
        """Every worker on one host cut off from every broker for longer than a task lease."""
        net = self.cluster.net
        assert net is not None
        host = self.rng.choice(net.names("w"))
        hit = [w for w in self.cluster.workers if w.host == host]
        seconds = self.rng.uniform(LEASE_TIMEOUT + 1.0, LEASE_TIMEOUT + 6.0)
        return self._cut("worker_host_cut", host, "mesh", seconds, hit)

    def client_cut(self) -> Fault:
        """The producers' host cut off while it submits (they submit all the time)."""
        net = self.cluster.net
        assert net is not None
        return self._cut(
            "client_cut", self.rng.choice(net.names("c")), "mesh", self.rng.uniform(0.5, 6.0), []
        )

    def db_cut(self) -> Fault:
        """One broker's database connections stall both ways (new ones wait), the others' go on."""
        broker = self.rng.choice(self.cluster.brokers)
        seconds = self.rng.uniform(0.5, 6.0)
        return self._through_proxy("db_cut", broker, seconds, "both ways", lambda p, a: p.cut(a))

    def db_oneway(self) -> Fault:
        """One broker's traffic to or from the database held (lost one way: TCP resends until it
        heals) or slowed, the other way flowing."""
        broker = self.rng.choice(self.cluster.brokers)
        direction = self.rng.choice(["up", "down"])
        seconds = self.rng.uniform(0.5, 5.0)
        if self.rng.random() < 0.5:
            return self._through_proxy(
                "db_oneway", broker, seconds, f"{direction} held", lambda p, a: p.hold(a, direction)
            )
        lag = round(self.rng.uniform(0.05, 0.5), 2)
        how = f"{direction} delayed {lag}s a chunk"
        return self._through_proxy("db_oneway", broker, seconds, how, lambda p, a: p.delay(a, direction, lag))

    def _cut(self, kind: str, host: str, link: str, seconds: float, hit: list[Member]) -> Fault:
        net = self.cluster.net
        assert net is not None
        fault = Fault(kind, host, time.time(), detail=f"{link} link down {seconds:.1f}s")
        fault.pids = [m.pid for m in hit if m.alive()]
        net.cut(host, link)
        try:
            time.sleep(seconds)
        finally:
            net.heal(host, link)
        fault.end = time.time()
        return fault

    def _through_proxy(
        self, kind: str, broker: Member, seconds: float, how: str, start: Callable[[PgProxy, str], None]
    ) -> Fault:
        assert self.proxy is not None and self.cluster.net is not None and broker.host is not None
        address = self.cluster.net.host(broker.host).db_address
        assert address is not None
        fault = Fault(kind, broker.name, time.time(), detail=f"{how} {seconds:.1f}s")
        fault.pids = [broker.pid] if broker.alive() else []
        start(self.proxy, address)
        try:
            time.sleep(seconds)
        finally:
            self.proxy.heal(address)
        fault.end = time.time()
        return fault


def kill(cluster: Cluster, kind: str, member: Member, down: float) -> Fault:
    """SIGKILL `member`, and start it again (same id and ports) `down` seconds later."""
    fault = Fault(kind, member.name, time.time(), detail=f"down {down:.1f}s")
    fault.pids.append(cluster.kill(member))
    time.sleep(down)
    cluster.start(member)
    fault.end = time.time()
    return fault


def pause(cluster: Cluster, kind: str, member: Member, seconds: float) -> Fault:
    """SIGSTOP `member` (it hangs rather than dies) for `seconds`, then SIGCONT."""
    fault = Fault(kind, member.name, time.time(), detail=f"stopped {seconds:.1f}s")
    fault.pids.append(cluster.pause(member))
    try:
        time.sleep(seconds)
    finally:
        cluster.resume(member)
    fault.end = time.time()
    return fault
