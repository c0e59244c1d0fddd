"""What people run through a broker, as the CLI runs it on the Store: QUEUES, LIST, SHOW,
REDRIVE, PURGE.

A request is parsed on the broker's loop, so a malformed one is refused at once and the database
never sees it; it runs on the broker's `ops` thread, a connection of its own, so a purge of a
million tasks holds up no lease and no commit. Replies are columns, timestamps seconds since
the Unix epoch (msgpack has no date type in this protocol).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conduit.store import Store
from conduit.tables import columns
from conduit.task import STATES, TaskDetail, TaskRow
from conduit.wire import (
    MAX_LIST,
    MAX_SHOW,
    Command,
    ErrorCode,
    Message,
    ProtocolError,
    check_queue,
    get_field,
    parse_ids,
    parse_queue,
)

REPLY_BUDGET = 8 * 1024 * 1024  # bytes of payloads, results and errors in one TASK_DETAILS


@dataclass(frozen=True)
class Operation:
    command: Command
    args: dict[str, Any]  # checked keyword arguments of the Store method it runs


def parse_operation(msg: Message) -> Operation:
    rid, body = msg.rid, msg.body
    if msg.command is Command.SHOW:
        ids = parse_ids(msg)
        if len(ids) > MAX_SHOW:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"SHOW takes at most {MAX_SHOW} ids", rid)
        return Operation(msg.command, {"ids": ids})
    if msg.command in (Command.REDRIVE, Command.PURGE):
        return Operation(msg.command, {"queue": parse_queue(msg)})
    if msg.command is Command.QUEUES:
        return Operation(msg.command, {})
    queue = get_field(body, "queue", str, rid, None)
    if queue is not None:
        check_queue(queue, rid)
    state = get_field(body, "state", str, rid, None)
    if state is not None and state not in STATES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"state {state!r} is not one of {', '.join(STATES)}", rid)
    limit = get_field(body, "limit", int, rid, 50)
    if not 1 <= limit <= MAX_LIST:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"limit must be 1 to {MAX_LIST}", rid)
    ages = {}
    for name in ("older_than", "newer_than"):
        age = get_field(body, name, (int, float), rid, None)
        if age is not None and not 0 <= age < 1e10:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be seconds, 0 or more", rid)
        ages[name] = age
    after = get_field(body, "after", str, rid, None)
    return Operation(msg.command, {"queue": queue, "state": state, "limit": limit, "after": after, **ages})


def run(op: Operation, store: Store) -> tuple[Command, dict[str, Any]]:
    """The reply to `op` and its body, less the rid. A BadCursor (a cursor this broker's listings
    never printed) is the caller's to answer as a bad request."""
    return _RUN[op.command](store, op.args)


def _queues(store: Store, _: dict[str, Any]) -> tuple[Command, dict[str, Any]]:
    rows = [(q, s, n) for q, counts in store.queue_stats().items() for s, n in counts.items()]
    return Command.QUEUE_LIST, {
        "queue": [r[0] for r in rows],
        "state": [r[1] for r in rows],
        "count": [r[2] for r in rows],
    }


def _list(store: Store, args: dict[str, Any]) -> tuple[Command, dict[str, Any]]:
    page = store.list_tasks(**args)
    return Command.TASK_LIST, {**columns(TaskRow, page.rows), "next": page.next}


def _show(store: Store, args: dict[str, Any]) -> tuple[Command, dict[str, Any]]:
    """As many of the tasks as fit the reply budget (always the first); `rest`: the ids asked for
    from the first left out on, to ask again."""
    details = store.show(args["ids"])
    size = 0
    for kept, d in enumerate(details):
        size += sum(len(v) for v in (d.payload, d.result, d.error) if v is not None)
        if size > REPLY_BUDGET and kept:
            asked = list(dict.fromkeys(args["ids"]))
            rest = asked[asked.index(d.id) :]
            return Command.TASK_DETAILS, {**columns(TaskDetail, details[:kept]), "rest": rest}
    return Command.TASK_DETAILS, {**columns(TaskDetail, details), "rest": []}


def _redrive(store: Store, args: dict[str, Any]) -> tuple[Command, dict[str, Any]]:
    return Command.DONE, {"count": store.redrive_all(args["queue"])}


def _purge(store: Store, args: dict[str, Any]) -> tuple[Command, dict[str, Any]]:
    return Command.DONE, {"count": store.purge(args["queue"])}


_RUN: dict[Command, Callable[[Store, dict[str, Any]], tuple[Command, dict[str, Any]]]] = {
    Command.QUEUES: _queues,
    Command.LIST: _list,
    Command.SHOW: _show,
    Command.REDRIVE: _redrive,
    Command.PURGE: _purge,
}
OPERATIONS = frozenset(_RUN)
WRITES = frozenset({Command.REDRIVE, Command.PURGE})  # not repeated on a new connection
