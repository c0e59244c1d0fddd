"""The Store: the only code that talks to PostgreSQL. One Store is one connection, for one thread."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql

from conduit.errors import BrokerLeaseLost, DatabaseError, SchemaError
from conduit.store.ops import Operations, refusal
from conduit.store.queries import QUERIES, SCHEMA, SCHEMA_VERSION, int_array
from conduit.task import (
    Ack,
    Completion,
    Failure,
    LeasedTask,
    Outcome,
    Submitted,
    TaskSpec,
    check_queue_name,
)

_POLICY = ("max_attempts", "lease_timeout", "backoff_base", "backoff_max")


IDLE_IN_TRANSACTION_MS = 2000
REAP_LOCK_TIMEOUT_MS = 100  # well under deadlock_timeout (1 s): the reaper is the one to yield
_queue = itemgetter(2)  # of a row that complete or fail accepted
BUCKET_SHIFT, BUCKETS = 17, 8  # as schema.sql partitions `tasks`: bucket = (id >> 17) & 7


@dataclass(frozen=True)
class BrokerLease:
    """A broker's claim on what it buffers; `epoch` fences off its earlier incarnations."""

    broker_id: str
    epoch: int


@dataclass(frozen=True)
class Peer:
    """Another live broker, as PONG and GOSSIP name it (docs/PROTOCOL.md §6.6)."""

    broker: str
    endpoint: str
    pub: str | None


@dataclass(frozen=True)
class Reaped:
    buffered: int  # returned from brokers whose lease ended
    running: int  # whose task lease expired: retried, or dead when out of attempts


def connect(dsn: str, schema: str) -> psycopg.Connection[Any]:
    """Open an autocommit connection with `schema` on the search path, or raise DatabaseError."""
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.ProgrammingError as exc:
        raise DatabaseError(f"invalid DSN: {_first_line(exc)}") from None
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL at {describe_dsn(dsn)}: {_reason(exc)}") from None
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    # Conduit never waits inside a transaction: one left open means its process stalled (paused,
    # swapped out). Its locks (a submit key a retry elsewhere waits on) go after about two
    # heartbeats, not when the process wakes up.
    conn.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_MS}ms'")
    # Every path into `tasks` is an index: a batch is a few hundred ids of a bucket that may hold
    # a hundred thousand, all cached, where the cost model (random_page_cost 4) can still prefer
    # to read the whole bucket, above all while its statistics are those of a nearly empty one.
    # The reaper's scan, which has no index, stays a sequential one. JIT never pays for Conduit's
    # short statements, and the costs this setting inflates would trigger it.
    conn.execute("SET enable_seqscan = off")
    conn.execute("SET jit = off")
    return conn


def describe_dsn(dsn: str) -> str:
    """host:port/dbname of a DSN, without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DSN)"
    host = str(info.get("host") or "local socket")
    port = info.get("port")
    return f"{host}{f':{port}' if port else ''}/{info.get('dbname') or info.get('user') or ''}"


def init_schema(dsn: str, schema: str) -> str:
    """Create Conduit's schema if absent, or migrate an older one; says which it did: "created",
    "migrated" or "current". Safe to run concurrently."""
    with connect(dsn, schema) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('conduit schema ' || %s))", (schema,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        version = _schema_version(conn)
        if version is None:
            conn.execute(SCHEMA.encode())
            return "created"
        found = version
        while version is not None and version < SCHEMA_VERSION:  # migrate, in the same transaction
            step = version + 1
            if f"migrate_to_{step}" in QUERIES:
                conn.execute(QUERIES[f"migrate_to_{step}"].encode())
            else:  # old tables moved aside, the schema made over what is left, the rows copied;
                conn.execute(QUERIES[f"migrate_to_{step}_before"].encode())  # the schema is the
                conn.execute(SCHEMA.encode())  # newest, so this may have been the last step
                conn.execute(QUERIES[f"migrate_to_{step}_after"].encode())
            version = _schema_version(conn)
        _check_version(conn, schema)
        return "migrated" if found < SCHEMA_VERSION else "current"


def _schema_version(conn: psycopg.Connection[Any]) -> int | None:
    (exists,) = _one(conn.execute(QUERIES["meta_exists"]))
    if not exists:
        return None
    (version,) = _one(conn.execute(QUERIES["schema_version"]))
    return int(version)


def _check_version(conn: psycopg.Connection[Any], schema: str) -> None:
    version = _schema_version(conn)
    if version is None:
        raise SchemaError(f"no Conduit schema {schema!r} in this database: run `conduit db init`")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"schema {schema!r} is at version {version}, this Conduit needs {SCHEMA_VERSION}: "
            + ("run `conduit db init` to migrate" if version < SCHEMA_VERSION else "upgrade Conduit")
        )


class Store(Operations):
    """Batched operations on tasks and leases. Each call commits on its own, or within `transaction()`.

    Most calls are one statement, atomic by itself, so outside a transaction they cost one round
    trip and no BEGIN/COMMIT."""

    def __init__(self, conn: psycopg.Connection[Any], *, max_payload_bytes: int) -> None:
        self.conn = conn
        self.max_payload_bytes = max_payload_bytes
        self._policies: dict[tuple[int, float, float, float], int] = {}  # committed policies' ids
        self._tentative: dict[tuple[int, float, float, float], int] = {}  # made in the open transaction
        self._ended = _no_endings()  # tasks completed, failed and made dead, per queue (take_ended)

    @classmethod
    def open(cls, dsn: str, *, schema: str = "conduit", max_payload_bytes: int = 1024 * 1024) -> Store:
        conn = connect(dsn, schema)
        try:
            _check_version(conn, schema)
        except BaseException:
            conn.close()
            raise
        return cls(conn, max_payload_bytes=max_payload_bytes)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several operations into one commit (group commit); nothing is durable before it ends."""
        try:
            with self.conn.transaction():
                yield
        finally:  # a policy made in a rolled-back transaction does not exist
            made, self._tentative = self._tentative, {}
        self._policies.update(made)

    # -- submitting ---------------------------------------------------------------------------

    def enqueue(self, specs: Sequence[TaskSpec]) -> list[Submitted]:
        """Insert pending tasks; a known idempotency key returns its first task's id instead."""
        return self.insert(specs, None, None)

    def insert(
        self, specs: Sequence[TaskSpec], owned: Sequence[bool] | None, owner: BrokerLease | None
    ) -> list[Submitted]:
        """Insert tasks; those marked `owned` are held by `owner` at attempt 1 if its lease is live
        (Submitted.owned says which were), for it to deliver from memory with no further write."""
        if not specs:
            return []
        for spec in specs:
            spec.validate(self.max_payload_bytes)
        policies = self._policy_ids(specs)
        params: dict[str, Any] = {"epoch": owner.epoch if owner and owned and any(owned) else None}
        _column(params, "queue", [s.queue for s in specs])
        _column(params, "priority", [s.priority for s in specs])
        _column(params, "delay", [float(s.delay) for s in specs])
        _column(params, "policy", policies)
        _column(
            params, "owned", list(owned) if params["epoch"] is not None and owned else [False] * len(specs)
        )
        params["payload"] = [bytes(s.payload) for s in specs]
        if all(s.idempotency_key is None for s in specs):
            rows = sorted(self._rows("insert_plain", params))
            return [Submitted(task_id, True, held) for task_id, held in rows]
        params["idempotency_key"] = [s.idempotency_key for s in specs]
        found = self._rows("insert_keyed", params)
        missing = [i for i, (task_id, _, _) in enumerate(found) if task_id is None]
        if missing:  # keys committed by other transactions: now visible to a new statement
            known = self._rows(
                "lookup_keys",
                {
                    "queue": [specs[i].queue for i in missing],
                    "key": [specs[i].idempotency_key for i in missing],
                },
            )
            for i, (task_id,) in zip(missing, known, strict=True):
                found[i] = (task_id, False, False)
        return [Submitted(task_id, created, held) for task_id, created, held in found]

    def _policy_ids(self, specs: Sequence[TaskSpec]) -> list[int]:
        keys = [
            (s.max_attempts, float(s.lease_timeout), float(s.backoff_base), float(s.backoff_max))
            for s in specs
        ]
        known = self._policies
        new = [k for k in dict.fromkeys(keys) if k not in known and k not in self._tentative]
        if new:
            params = {name: [k[i] for k in new] for i, name in enumerate(_POLICY)}
            made = dict(zip(new, (row[0] for row in self._rows("policy_ids", params)), strict=True))
            in_tx = self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
            (self._tentative if in_tx else known).update(made)
        tentative = self._tentative
        return [known[k] if k in known else tentative[k] for k in keys]

    def claim_submits(self, keys: Sequence[str]) -> dict[str, list[int] | None]:
        """Claim distinct submit keys for this transaction. None: claimed, so insert the submit's
        tasks and then `record_submits`; a list: the ids of the submit that committed the key."""
        claimed = {key for (key,) in self._rows("claim_submits", {"key": list(keys)})}
        taken = [key for key in keys if key not in claimed]
        found = dict(self._rows("submitted_ids", {"key": taken})) if taken else {}
        return {key: None if key in claimed else list(found[key]) for key in keys}

    def record_submits(self, ids: dict[str, list[int]]) -> None:
        """Store the ids of the submits whose keys `claim_submits` claimed."""
        params = {
            "key": list(ids),
            "n": [len(task_ids) for task_ids in ids.values()],
            "id": int_array(task_id for task_ids in ids.values() for task_id in task_ids),
        }
        self.conn.execute(QUERIES["record_submits"], params, binary=True)

    # -- broker leases ------------------------------------------------------------------------

    def acquire_broker(
        self, broker_id: str, endpoint: str, term: float, pub: str | None = None
    ) -> BrokerLease:
        """`endpoint` and `pub`: where peers reach this broker, named to them by its peers."""
        params = {"id": broker_id, "endpoint": endpoint, "pub": pub, "term": term}
        (epoch,) = _one(self.conn.execute(QUERIES["acquire_broker"], params))
        return BrokerLease(broker_id, epoch)

    def renew_broker(self, owner: BrokerLease, term: float) -> None:
        """Extend the lease; raise BrokerLeaseLost if it lapsed or was taken, so the buffer is dropped."""
        params = {"epoch": owner.epoch, "term": term}
        if not self._rows("renew_broker", params):
            raise BrokerLeaseLost(f"broker {owner.broker_id} lost its lease (epoch {owner.epoch})")

    def drop_broker(self, owner: BrokerLease) -> None:
        self.conn.execute(QUERIES["drop_broker"], {"epoch": owner.epoch})

    def live_brokers(self) -> list[str]:
        """ROUTER endpoints of the brokers whose lease is live."""
        return [endpoint for (endpoint,) in self._rows("live_brokers")]

    def broker_peers(self, broker_id: str) -> list[Peer]:
        """The other live brokers (latest incarnation of each) and where to reach them."""
        return [Peer(*row) for row in self._rows("broker_peers", {"id": broker_id})]

    # -- leasing and fenced writes ------------------------------------------------------------

    def lease(self, owner: BrokerLease, queue: str, limit: int) -> list[LeasedTask]:
        """Lease up to `limit` due tasks into `owner`'s buffer, in (priority, run_at, id) order."""
        check_queue_name(queue)
        params = {"epoch": owner.epoch, "queue": queue, "limit": limit}
        rows = self._rows("lease", params)
        if not rows and not self._rows("check_broker", {"epoch": owner.epoch}):
            raise BrokerLeaseLost(f"broker {owner.broker_id} has no live lease (epoch {owner.epoch})")
        tasks = [LeasedTask(*row) for row in rows]
        tasks.sort(key=lambda t: (t.priority, t.run_at, t.id))
        return tasks

    def read_back(
        self, owner: BrokerLease, queue: str, span: tuple[int, int], limit: int
    ) -> list[LeasedTask]:
        """Read `owner`'s own held, undelivered tasks of `queue` with ids in `span`, in id order:
        no write, they are its already. Raises BrokerLeaseLost if its lease has ended."""
        params = {"epoch": owner.epoch, "queue": queue, "lo": span[0], "hi": span[1], "limit": limit}
        rows = self._rows("read_back", params)
        if not rows and not self._rows("check_broker", {"epoch": owner.epoch}):
            raise BrokerLeaseLost(f"broker {owner.broker_id} has no live lease (epoch {owner.epoch})")
        return [LeasedTask(*row) for row in rows]

    def release_spans(self, owner: BrokerLease, spans: Sequence[tuple[str, int, int]]) -> int:
        """Give back `owner`'s held, undelivered tasks of each (queue, lo, hi): pending again."""
        params = {
            "epoch": owner.epoch,
            "queue": [q for q, _, _ in spans],
            "lo": [lo for _, lo, _ in spans],
            "hi": [hi for _, _, hi in spans],
        }
        ((released,),) = self._rows("release_spans", params)
        return int(released)

    def start(self, owner: BrokerLease, acks: Sequence[Ack]) -> list[Outcome]:
        """Deliveries held in `owner`'s memory made task leases in the database (it is stopping)."""
        params = {"id": [a.id for a in acks], "attempt": [a.attempt for a in acks], "epoch": owner.epoch}
        return self._fenced("start", acks, params)

    def renew(self, relay: BrokerLease, acks: Sequence[Ack]) -> list[Outcome]:
        """Heartbeats: extend the task leases of current deliveries, through whichever broker relays."""
        params = {"id": [a.id for a in acks], "attempt": [a.attempt for a in acks], "epoch": relay.epoch}
        return self._fenced("renew", acks, params)

    def complete(self, completions: Sequence[Completion]) -> list[Outcome]:
        """Finish tasks with their results; only the delivery holding the current attempt may."""
        params = {
            "id": [c.id for c in completions],
            "attempt": [c.attempt for c in completions],
            "result": [c.result for c in completions],
        }
        rows = self._accepted("complete", params)
        self._ended["completed"].update(map(_queue, rows))
        return _outcomes(self, completions, rows)

    def fail(self, failures: Sequence[Failure]) -> list[Outcome]:
        """Record failed runs: retried after backoff, or dead after max_attempts or retry=False."""
        return _outcomes(self, failures, self._failed(_failure_params(failures)))

    def expire(self, owner: BrokerLease, acks: Sequence[Ack]) -> list[Outcome]:
        """Deliveries that never heartbeated within their lease: failed runs, if still only buffered."""
        failures = [Failure(a.id, a.attempt, "lease expired: no heartbeat after delivery") for a in acks]
        return _outcomes(self, failures, self._failed(_failure_params(failures, owner)))

    def _failed(self, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        rows = self._accepted("fail", params)
        self._ended["failed"].update(map(_queue, rows))
        self._ended["dead"].update(row[2] for row in rows if row[3])
        return rows

    def take_ended(self) -> dict[str, dict[str, int]]:
        """Per ending (completed, failed, dead), per queue, the tasks this connection's writes ended
        since the last call: the broker's metrics, counted from the rows the writes return anyway."""
        ended, self._ended = self._ended, _no_endings()
        return {ending: dict(counts) for ending, counts in ended.items() if counts}

    def release(self, acks: Sequence[Ack]) -> list[Outcome]:
        """Give back unstarted tasks: pending again at once, attempt kept, no failure counted."""
        params = {"id": [a.id for a in acks], "attempt": [a.attempt for a in acks]}
        return self._fenced("release", acks, params)

    def _fenced(
        self, name: str, items: Sequence[Ack | Completion | Failure], params: dict[str, Any]
    ) -> list[Outcome]:
        return _outcomes(self, items, self._accepted(name, params) if items else [])

    def _accepted(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The rows a fenced write accepted: (id, attempt, ...), one statement per bucket."""
        if not params["id"]:
            return []
        return [row for part in _by_id(params) for row in self._rows(name, part)]

    # -- recovery and administration ----------------------------------------------------------

    def truncate_buckets(self) -> int:
        """Empty the task buckets with no live row left (their dead rows go with them); returns how many."""
        ((done,),) = self._rows("truncate_buckets")
        return int(done)

    def reap(self, limit: int = 1000) -> Reaped:
        """Return expired leases: what lapsed brokers held to pending; expired runs count as failures.

        The reaper locks a dead broker's rows in table order, writers in theirs: rather than wait
        into a deadlock (where the loser may be a broker's commit), it gives up after 100 ms and
        tries again on its next pass."""
        try:
            with self.conn.transaction():
                self.conn.execute(f"SET LOCAL lock_timeout = '{REAP_LOCK_TIMEOUT_MS}ms'")
                ((buffered,),) = self._rows("reap_brokers")
                expired = [
                    Failure(task_id, attempt, "lease expired: the worker stopped heartbeating")
                    for task_id, attempt in self._rows("expired_running", {"limit": limit})
                ]
                running = len(self._failed(_failure_params(expired))) if expired else 0
        except psycopg.errors.LockNotAvailable:
            return Reaped(0, 0)
        return Reaped(buffered, running)

    def notify(self, queues: Sequence[str]) -> None:
        """Tell listening brokers that these queues got due tasks; sent when the transaction commits."""
        self.conn.execute(QUERIES["notify"], {"queue": list(queues)})

    def listen(self) -> str:
        """LISTEN on this schema's channel (for `conn.notifies()`); returns the channel name."""
        (schema,) = _one(self.conn.execute("SELECT current_schema()"))
        channel = f"conduit_{schema}"
        self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        return channel

    def compact_counts(self) -> None:
        self.conn.execute(QUERIES["compact_counts"])

    # -- history ------------------------------------------------------------------------------

    def ensure_partitions(self, days: int = 3) -> int:
        """Make the history partitions for today and the days ahead; returns how many were new."""
        ((made,),) = self._rows("ensure_partitions", {"days": days})
        return int(made)

    def retention(self) -> float:
        """Days finished tasks (and idempotency and submit keys) are kept."""
        ((days,),) = self._rows("retention")
        return float(days)

    def set_retention(self, days: float) -> None:
        self.conn.execute(QUERIES["set_retention"], {"days": days})

    def prune(self, days: float | None = None) -> int:
        """Drop the days of history that ended more than `days` ago (default: the retention);
        returns the partitions dropped."""
        ((dropped,),) = self._rows("prune", {"days": self.retention() if days is None else days})
        return int(dropped)


def _no_endings() -> dict[str, Counter[str]]:
    return {"completed": Counter(), "failed": Counter(), "dead": Counter()}


def _outcomes(
    store: Store, items: Sequence[Ack | Completion | Failure], rows: list[tuple[Any, ...]]
) -> list[Outcome]:
    """Each item's outcome, from the rows its write accepted (by id and attempt) and, for the
    others, what the task's state says."""
    accepted = {(row[0], row[1]) for row in rows}
    outcomes: list[Outcome | None] = []
    for item in items:  # by id and attempt: a stale row beside the current one stays refused
        outcomes.append(Outcome.OK if (item.id, item.attempt) in accepted else None)
        accepted.discard((item.id, item.attempt))  # a duplicate in the batch changed nothing
    refused = [i for i, o in enumerate(outcomes) if o is None]
    if refused:
        infos = store.lookup([items[i].id for i in refused])
        for i, info in zip(refused, infos, strict=True):
            outcomes[i] = refusal(info)
    return [o for o in outcomes if o is not None]


def _failure_params(
    failures: Sequence[Failure], only_buffered_by: BrokerLease | None = None
) -> dict[str, Any]:
    return {
        "id": [f.id for f in failures],
        "attempt": [f.attempt for f in failures],
        "error": [f.error for f in failures],
        "retry": [f.retry for f in failures],
        "epoch": only_buffered_by.epoch if only_buffered_by else None,
    }


def _by_id(params: dict[str, Any]) -> list[dict[str, Any]]:
    """`params` of a statement by id and attempt, as one set per bucket of its ids (`bucket`
    added): one when the ids are consecutive-ish, as a batch nearly always is."""
    ids: list[int] = params["id"]
    if min(ids) >> BUCKET_SHIFT == max(ids) >> BUCKET_SHIFT:
        parts = [{**params, "bucket": (ids[0] >> BUCKET_SHIFT) % BUCKETS}]
    else:
        rows: dict[int, list[int]] = {}
        for i, task_id in enumerate(ids):
            rows.setdefault((task_id >> BUCKET_SHIFT) % BUCKETS, []).append(i)
        columns = [k for k, v in params.items() if isinstance(v, list)]
        parts = [
            {**params, **{k: [params[k][i] for i in picked] for k in columns}, "bucket": bucket}
            for bucket, picked in rows.items()
        ]
    return [{**part, "id": int_array(part["id"]), "attempt": int_array(part["attempt"])} for part in parts]


def _column(params: dict[str, Any], name: str, values: list[Any]) -> None:
    """A column as one value when every row has it (`name`_all), else as an array: sparing the
    database an array it would unpack row by row, and the wire a list of repeats."""
    uniform = all(v == values[0] for v in values)
    params[name] = None if uniform else values
    params[f"{name}_all"] = values[0] if uniform else None


def _one(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    row = cursor.fetchone()
    assert row is not None
    return row


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _reason(exc: Exception) -> str:
    """The cause psycopg gives after its 'connection to server ... failed:' preamble."""
    text = " ".join(str(exc).split())
    causes = re.findall(
        r"failed: (.+?)(?= Multiple connection attempts failed| connection to server|$)", text
    )
    return causes[-1].strip() if causes else _first_line(exc)
