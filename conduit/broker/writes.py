"""Group commit: the writes a broker collects between commits, and how one batch is carried out.

Many requests' writes go into one transaction, each kind merged into one batched store call, and
every caller gets its own share of the outcome (Temporal's task writer, in spirit). Writes go in
two lanes, each with one commit in flight on a connection of its own: submits, and the reports
and bookkeeping of tasks already committed. Neither waits behind the other, and no write in one
lane can depend on one in flight in the other: a task is reported on, released or expired only
after its submit's commit was heard.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from conduit.store import BrokerLease, Store
from conduit.task import Ack, Outcome, Submitted, TaskSpec

SUBMITS, REPORTS = "submits", "reports"  # the write lanes
LANES = (SUBMITS, REPORTS)


@dataclass(frozen=True)
class SubmitOp:
    peer: bytes
    rid: int
    specs: list[TaskSpec]
    waiters: list[int | None]  # sync match: the core's key for the poll each task goes to, or None
    owned: list[bool]  # inserted held by this broker: sync matched, or for its buffer
    key: str | None = None  # the submit key: a retried SUBMIT with it inserts nothing again


@dataclass(frozen=True)
class RequestOp:
    peer: bytes
    rid: int
    kind: str  # a Store method: renew, complete, fail, release, cancel, retry
    items: list[Any]
    elapsed: list[float | None] | None = None  # COMPLETE and FAIL: each run's seconds, as the worker measured


@dataclass
class WriteBatch:
    submits: list[SubmitOp] = field(default_factory=list)
    ops: list[RequestOp] = field(default_factory=list)
    starts: list[Ack] = field(default_factory=list)  # deliveries made task leases (at shutdown)
    expiries: list[Ack] = field(default_factory=list)  # deliveries never heard of again
    releases: list[Ack] = field(default_factory=list)  # the broker's own give-backs
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # its own backlog given back
    notify: list[str] = field(default_factory=list)  # queues to wake other brokers for, at commit

    def add_request(
        self, peer: bytes, rid: int, kind: str, items: list[Any], elapsed: list[float | None] | None = None
    ) -> None:
        self.ops.append(RequestOp(peer, rid, kind, items, elapsed))

    def requests(self) -> list[tuple[bytes, int]]:
        """Who waits on this commit: each submit and request, as (peer, rid)."""
        return [(op.peer, op.rid) for op in self.submits] + [(op.peer, op.rid) for op in self.ops]

    def take(self, lane: str) -> WriteBatch | None:
        """Move this lane's part out into a batch of its own; None if there is nothing in it."""
        if lane == SUBMITS:
            if not self.submits:
                return None
            taken = WriteBatch(submits=self.submits, notify=self.notify)
            self.submits, self.notify = [], []
            return taken
        taken = WriteBatch(
            ops=self.ops, starts=self.starts, expiries=self.expiries, releases=self.releases, spans=self.spans
        )
        if taken.empty():
            return None
        self.ops, self.starts, self.expiries, self.releases, self.spans = [], [], [], [], []
        return taken

    def statements(self) -> int:
        """How many store calls `execute` makes for this batch."""
        kinds = {op.kind for op in self.ops}
        return (
            2 * any(op.key for op in self.submits)  # claim the keys, record the ids
            + bool(self.submits)
            + len(kinds)
            + bool(self.starts)
            + bool(self.expiries)
            + bool(self.releases)
            + bool(self.spans)
            + bool(self.notify)
        )

    def empty(self) -> bool:
        return not (self.submits or self.ops or self.starts or self.expiries or self.releases or self.spans)


@dataclass(frozen=True)
class WriteResult:
    submitted: list[list[Submitted] | None]  # per SubmitOp; None: its key names another submit
    outcomes: list[list[Outcome]]  # per RequestOp
    ended: dict[str, dict[str, int]] = field(default_factory=dict)  # Store.take_ended(): per queue


def execute(store: Store, batch: WriteBatch, owner: BrokerLease) -> WriteResult:
    """Carry out a batch in one transaction: nothing in it is acknowledged before the commit.
    A batch of one statement (a lone submit, say) needs no BEGIN and COMMIT: it is atomic alone."""
    store.take_ended()  # what an earlier, failed batch counted was rolled back
    with nullcontext() if batch.statements() == 1 else store.transaction():
        earlier, claimed = _claim(store, batch.submits)
        fresh = [op for i, op in enumerate(batch.submits) if op.key is None or claimed.get(op.key) == i]
        inserted = iter(
            store.insert(
                [spec for op in fresh for spec in op.specs], [o for op in fresh for o in op.owned], owner
            )
        )
        submitted: list[list[Submitted] | None] = [
            [next(inserted) for _ in op.specs] if op.key is None or claimed.get(op.key) == i else None
            for i, op in enumerate(batch.submits)
        ]
        ids = {key: [s.id for s in submitted[i] or ()] for key, i in claimed.items()}
        if ids:
            store.record_submits(ids)
        outcomes = _merged(store, batch.ops, owner)
        if batch.starts:
            store.start(owner, batch.starts)
        if batch.expiries:
            store.expire(owner, batch.expiries)
        if batch.releases:
            store.release(batch.releases)
        if batch.spans:
            store.release_spans(owner, batch.spans)
        if batch.notify:
            store.notify(batch.notify)
    known = {**earlier, **ids}
    for i, op in enumerate(batch.submits):
        if op.key is not None and claimed.get(op.key) != i:  # a replay: the key's ids, or refused
            got = known[op.key]
            submitted[i] = (
                [Submitted(task_id, False) for task_id in got] if len(got) == len(op.specs) else None
            )
    return WriteResult(submitted, outcomes, store.take_ended())


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
