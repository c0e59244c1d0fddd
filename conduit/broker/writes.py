"""Group commit: the writes a broker collects between commits, and how one batch is carried out.

Many requests' writes go into one transaction, each kind merged into one batched store call, and
every caller gets its own share of the outcome (Temporal's task writer, in spirit).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from conduit.store import BrokerLease, Store
from conduit.task import Ack, Outcome, Submitted, TaskSpec


@dataclass(frozen=True)
class SubmitOp:
    peer: bytes
    rid: int
    specs: list[TaskSpec]
    workers: list[str | None]  # sync match: the waiting worker each task goes to, or None
    waiters: list[int | None]  # the core's key for that worker's poll
    key: str | None = None  # the submit key: a retried SUBMIT with it inserts nothing again


@dataclass(frozen=True)
class RequestOp:
    peer: bytes
    rid: int
    kind: str  # a Store method: renew, complete, fail, release, cancel
    items: list[Any]


@dataclass
class WriteBatch:
    submits: list[SubmitOp] = field(default_factory=list)
    ops: list[RequestOp] = field(default_factory=list)
    starts: list[tuple[Ack, str]] = field(default_factory=list)  # deliveries made task leases (at shutdown)
    expiries: list[Ack] = field(default_factory=list)  # deliveries never heard of again
    releases: list[Ack] = field(default_factory=list)  # the broker's own give-backs
    notify: list[str] = field(default_factory=list)  # queues to wake other brokers for, at commit
    requests: list[tuple[bytes, int]] = field(default_factory=list)  # who waits on this commit

    def add_request(self, peer: bytes, rid: int, kind: str, items: list[Any]) -> None:
        self.ops.append(RequestOp(peer, rid, kind, items))
        self.requests.append((peer, rid))

    def statements(self) -> int:
        """How many store calls `execute` makes for this batch."""
        workers = [w for op in self.submits for w in op.workers]
        kinds = {op.kind for op in self.ops}
        return (
            2 * any(op.key for op in self.submits)  # claim the keys, record the ids
            + (None in workers)
            + any(w is not None for w in workers)
            + len(kinds)
            + bool(self.starts)
            + bool(self.expiries)
            + bool(self.releases)
            + bool(self.notify)
        )

    def empty(self) -> bool:
        return not (self.submits or self.ops or self.starts or self.expiries or self.releases)


@dataclass(frozen=True)
class WriteResult:
    submitted: list[list[Submitted] | None]  # per SubmitOp; None: its key names another submit
    outcomes: list[list[Outcome]]  # per RequestOp


def execute(store: Store, batch: WriteBatch, owner: BrokerLease) -> WriteResult:
    """Carry out a batch in one transaction: nothing in it is acknowledged before the commit.
    A batch of one statement (a lone submit, say) needs no BEGIN and COMMIT: it is atomic alone."""
    with nullcontext() if batch.statements() == 1 else store.transaction():
        earlier, claimed = _claim(store, batch.submits)
        fresh = [i for i, op in enumerate(batch.submits) if op.key is None or claimed.get(op.key) == i]
        plain = [(i, j) for i in fresh for j, w in enumerate(batch.submits[i].workers) if w is None]
        matched = [(i, j) for i in fresh for j, w in enumerate(batch.submits[i].workers) if w is not None]
        submitted: list[list[Submitted | None]] = [[None] * len(op.specs) for op in batch.submits]
        specs = [batch.submits[i].specs[j] for i, j in plain]
        for (i, j), sub in zip(plain, store.enqueue(specs), strict=True):
            submitted[i][j] = sub
        specs = [batch.submits[i].specs[j] for i, j in matched]
        workers = [batch.submits[i].workers[j] or "" for i, j in matched]
        for (i, j), sub in zip(matched, store.insert_running(specs, workers, owner), strict=True):
            submitted[i][j] = sub
        ids = {key: [s.id for s in submitted[i] if s is not None] for key, i in claimed.items()}
        if ids:
            store.record_submits(ids)
        outcomes = _merged(store, batch.ops, owner)
        if batch.starts:
            store.start(owner, [a for a, _ in batch.starts], [w for _, w in batch.starts])
        if batch.expiries:
            store.expire(owner, batch.expiries)
        if batch.releases:
            store.release(batch.releases)
        if batch.notify:
            store.notify(batch.notify)
    results: list[list[Submitted] | None] = [[s for s in subs if s is not None] for subs in submitted]
    known = {**earlier, **ids}
    for i, op in enumerate(batch.submits):
        if op.key is not None and claimed.get(op.key) != i:  # a replay: the key's ids, or refused
            got = known[op.key]
            results[i] = [Submitted(task_id, False) for task_id in got] if len(got) == len(op.specs) else None
    return WriteResult(results, outcomes)


def _claim(store: Store, submits: list[SubmitOp]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Submit keys: the ids of those committed before, and for each key claimed now the submit
    that inserts for it (a later submit with that key, in this batch, is a replay of it)."""
    keys = list(dict.fromkeys(op.key for op in submits if op.key is not None))
    found = store.claim_submits(keys) if keys else {}
    earlier = {key: ids for key, ids in found.items() if ids is not None}
    claimed: dict[str, int] = {}
    for i, op in enumerate(submits):
        if op.key is not None and op.key not in earlier and op.key not in claimed:
            claimed[op.key] = i
    return earlier, claimed


def _merged(store: Store, ops: list[RequestOp], owner: BrokerLease) -> list[list[Outcome]]:
    """One store call per kind for all requests of that kind; each request gets its slice back."""
    outcomes: list[list[Outcome]] = [[] for _ in ops]
    for kind in dict.fromkeys(op.kind for op in ops):
        mine = [i for i, op in enumerate(ops) if op.kind == kind]
        items = [item for i in mine for item in ops[i].items]
        results = store.renew(owner, items) if kind == "renew" else getattr(store, kind)(items)
        start = 0
        for i in mine:
            outcomes[i] = results[start : start + len(ops[i].items)]
            start += len(ops[i].items)
    return outcomes
