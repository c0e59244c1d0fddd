"""The fault scheduler: seeded, so a run's schedule (which fault, whom, for how long) repeats
with its seed. Every fault is recorded with its time window, so the checker can tell whether a
re-execution has a cause."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from chaos.cluster import Cluster, Member
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
        gap: tuple[float, float] = (1.0, 4.0),
        progress: Callable[[str], None] = lambda _: None,
    ) -> None:
        super().__init__(name="faults", daemon=True)
        self.cluster = cluster
        self.rng = rng
        self.postgres = postgres
        self.gap = gap
        self.progress = progress
        own_server = ("pg_restart", "pg_pause")  # never done to a shared server
        self.kinds = [k for k in KINDS if k not in own_server or postgres is not None]
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
