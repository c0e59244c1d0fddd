"""What people do to tasks by hand: look them up, list, cancel, retry, redrive, purge, pause.

A base of `Store` (which adds the hot paths): every call is a named query or two from
queries.sql, and each one that moves tasks writes its own counter deltas, so `queue_stats` stays
exact. Listings page by keyset on an index (`Page.next` is the cursor), never by OFFSET or COUNT.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from conduit.errors import ConduitError
from conduit.store.queries import QUERIES, int_array
from conduit.task import (
    FINAL_STATES,
    LIVE_STATES,
    STATES,
    Outcome,
    Page,
    TaskDetail,
    TaskInfo,
    TaskRow,
    check_queue_name,
)

PURGE_BATCH = 10_000
MAX_CURSOR = 1_000  # characters: a cursor holds an id, a queue name, a priority and a time
# Statements that read `tasks` by id or in order, planned at every run for the buckets as they are
# (see queries.sql): a plan cached while a bucket looked small scans, hashes or sorts all of it
# once it fills. A bucketed one is planned for its one partition, which costs little.
REPLANNED = frozenset(
    (
        "lease",
        "start",
        "renew",
        "complete",
        "fail",
        "release",
        "lookup",
        "cancel",
        "read_back",
        "expired_running",
        "release_spans",
    )
)


class BadCursor(ConduitError):
    """A --after cursor that no listing of this kind printed."""


@dataclass(frozen=True)
class BrokerRow:
    """A broker incarnation as the brokers table has it: its lease, not whether it answers."""

    broker: str
    epoch: int
    endpoint: str
    started_at: datetime
    expires_at: datetime
    live: bool  # its lease has not expired (on the database clock)
    now: datetime  # the database clock when read, to say how long the lease has left

    @property
    def lease_left(self) -> float:
        """Seconds until the lease expires; negative once it has."""
        return (self.expires_at - self.now).total_seconds()


class Operations:
    """Needs `conn`, an autocommit connection with Conduit's schema on its search path."""

    conn: psycopg.Connection[Any]

    def _rows(self, name: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        prepare = False if name in REPLANNED else None  # None: psycopg prepares it after 5 runs
        return self.conn.execute(QUERIES[name], params, binary=True, prepare=prepare).fetchall()

    def lookup(self, ids: Sequence[int]) -> list[TaskInfo]:
        if not ids:
            return []
        return [TaskInfo(*row) for row in self._rows("lookup", {"id": int_array(ids)})]

    def show(self, ids: Sequence[int]) -> list[TaskDetail]:
        """All that is kept about each task found, in the order of `ids` (unknown ones left out)."""
        found = {row[0]: TaskDetail(*row) for row in self._rows("show", {"id": list(ids)})}
        return [found[i] for i in dict.fromkeys(ids) if i in found]

    def queue_stats(self) -> dict[str, dict[str, int]]:
        """Per queue, tasks by state, from the counters (never a COUNT over the backlog)."""
        stats: dict[str, dict[str, int]] = {}
        for queue, state, n in self._rows("queue_stats"):
            stats.setdefault(queue, {})[state] = n
        return stats

    def list_tasks(
        self,
        *,
        queue: str | None = None,
        state: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> Page:
        """A page of tasks. `state` None lists live tasks by id; "pending" lists them in the order
        they run; a final state lists them newest first. Ages are seconds before now."""
        if queue is not None:
            check_queue_name(queue)
        if state is not None and state not in STATES:
            raise ConduitError(f"state {state!r} is not one of {', '.join(STATES)}")
        if not 1 <= limit <= 10_000:
            raise ConduitError(f"limit must be 1..10000, got {limit}")
        kind = "pending" if state == "pending" else "finished" if state in FINAL_STATES else "live"
        params: dict[str, Any] = {
            "queue": queue,
            "state": state,
            "older": older_than,
            "newer": newer_than,
            "limit": limit,
            **_keyset(kind, after),
        }
        rows = [TaskRow(*row) for row in self._rows(f"list_{kind}", params)]
        return Page(rows, _cursor(kind, rows[-1]) if len(rows) == limit else None)

    def cancel(self, ids: Iterable[int]) -> list[Outcome]:
        """Cancel live tasks, whatever their state; a running one's later complete is refused."""
        ids = list(ids)
        cancelled = {row[0] for row in self._rows("cancel", {"id": int_array(ids)})}
        return [Outcome.OK if info.id in cancelled else refusal(info) for info in self.lookup(ids)]

    def retry(self, ids: Iterable[int]) -> list[Outcome]:
        """Dead or cancelled tasks back to pending, failures forgiven. Refused: `live` (it has not
        ended), `finished` (it completed), `unknown`."""
        ids = list(ids)
        back = {row[0] for row in self._rows("retry", {"id": ids})}
        return [
            Outcome.OK if info.id in back else Outcome.LIVE if info.state in LIVE_STATES else refusal(info)
            for info in self.lookup(ids)
        ]

    def discard(self, ids: Iterable[int]) -> list[int]:
        """Drop dead tasks for good (their payloads too, so they can no longer be retried); returns
        the ids dropped. Others are left as they are."""
        return sorted(row[0] for row in self._rows("discard", {"id": list(ids)}))

    def brokers(self) -> list[BrokerRow]:
        """Every broker incarnation in the table, live or ended and not yet reaped; newest first
        per broker id."""
        return [BrokerRow(*row) for row in self._rows("broker_rows")]

    def redrive(self, queue: str, ids: Sequence[int] | None = None, limit: int = 10_000) -> list[int]:
        """Put dead tasks of `queue` back to pending, failures forgiven; returns their ids."""
        check_queue_name(queue)
        params = {"queue": queue, "id": list(ids) if ids is not None else None, "limit": limit}
        with self.conn.transaction():
            dead = [row[0] for row in self._rows("dead_page", params)]
            return sorted(row[0] for row in self._rows("retry", {"id": dead})) if dead else []

    def redrive_all(self, queue: str) -> int:
        """Every dead task of `queue` back to pending, a batch a commit; returns how many."""
        done = 0
        while batch := self.redrive(queue):
            done += len(batch)
        return done

    def pause(self, queue: str) -> bool:
        """Durably pause `queue`: brokers stop delivering it (submits are still kept); False if it
        was paused already. Listening brokers hear of it at once, the others within a keeper tick."""
        check_queue_name(queue)
        return bool(self._rows("pause_queue", {"queue": queue})[0][0])

    def resume(self, queue: str) -> bool:
        """Undo `pause`; False if `queue` was not paused."""
        check_queue_name(queue)
        return bool(self._rows("resume_queue", {"queue": queue})[0][0])

    def paused(self) -> dict[str, datetime]:
        """The paused queues, with when each was paused."""
        return dict(self._rows("paused_queues"))

    def purge(self, queue: str) -> int:
        """Cancel every task of `queue` that has not started: pending ones a batch a commit, then
        those brokers hold (buffered, their own backlog, deliveries not yet confirmed by a
        heartbeat). Running tasks are left to finish. Purged tasks are kept as cancelled with
        their payloads, so a client waiting on one hears it ended, and `retry` can undo it."""
        check_queue_name(queue)
        done = 0
        for name, params in (
            ("purge_pending", {"queue": queue, "limit": PURGE_BATCH}),
            ("purge_held", {"queue": queue}),
        ):
            while True:
                with self.conn.transaction():
                    ids = [row[0] for row in self._rows(name, params)]
                    if ids:
                        done += len(self._rows("cancel", {"id": int_array(ids)}))
                if len(ids) < PURGE_BATCH:
                    break
        return done


def refusal(info: TaskInfo) -> Outcome:
    if info.state is None:
        return Outcome.UNKNOWN
    if info.state == "cancelled":
        return Outcome.CANCELLED
    if info.state in ("completed", "dead"):
        return Outcome.FINISHED
    return Outcome.STALE


# A cursor is the last row's sort key, as url-safe base64 of JSON, tagged with its listing's kind.
def _cursor(kind: str, row: TaskRow) -> str:
    key: list[Any] = [kind, row.id]
    if kind == "pending":
        key += [row.queue, row.priority, row.since.isoformat()]
    elif kind == "finished":
        key.append(row.since.isoformat())
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def _keyset(kind: str, after: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"k_id": None, "k_queue": None, "k_priority": None, "k_at": None}
    if after is None:
        return params
    if len(after) > MAX_CURSOR:
        raise BadCursor("cursor is not one this listing printed: far too long")
    try:
        key = json.loads(base64.urlsafe_b64decode(after + "=" * (-len(after) % 4)))
        if key[0] != kind:
            raise ValueError(key[0])
        params["k_id"] = int(key[1])
        if kind == "pending":
            params |= {"k_queue": str(key[2]), "k_priority": int(key[3])}
        if kind != "live":
            params["k_at"] = datetime.fromisoformat(key[-1])
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, RecursionError):
        raise BadCursor(f"cursor {after!r} is not one this listing printed") from None
    return params
