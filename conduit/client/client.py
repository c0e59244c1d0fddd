"""conduit.client.Client: submit tasks, read results, cancel. Synchronous and thread-safe."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, overload

from conduit.client.channel import BrokerError, BrokerTimeout, Channel, NotConnected
from conduit.client.link import LIVENESS
from conduit.client.mesh import BrokerView, Mesh
from conduit.client.stats import BrokerStats, parse_stats
from conduit.client.tasks import Task, TaskHandle
from conduit.curve import ClientCurve, client_context
from conduit.endpoints import check_endpoint
from conduit.errors import ConduitError
from conduit.tables import records
from conduit.task import FINAL_STATES, Page, TaskDetail, TaskRow, TaskSpec, check_queue_name
from conduit.wire import MAX_BATCH, MAX_SHOW, Command, submit_body

MOVE_ON = frozenset({"shutting_down", "busy", "bad_version"})  # nothing was done: try another broker
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class WorkerSeen:
    """A worker connection as one broker sees it (`Client.workers`)."""

    broker: str
    endpoint: str
    worker: str | None  # the name it polls with; None if it only heartbeated here
    peer: str  # its connection's routing id, hex
    queues: list[str]  # what its last poll here asked for
    polls: int  # polls of it waiting here now
    holding: int  # tasks it holds through this broker: delivered here, or heartbeated here
    heard: float  # seconds since this broker last heard from it
    # What its polls say of it (None when they do not: an older worker, or only heartbeats here).
    host: str | None = None
    pid: int | None = None
    concurrency: int | None = None
    running: int | None = None  # of `holding`, how many run (its last heartbeat here); the rest wait

    @property
    def prefetched(self) -> int | None:
        """Of `holding`, those not running yet (None when the worker does not say)."""
        return None if self.running is None else self.holding - self.running

    def as_dict(self) -> dict[str, Any]:
        """Its fields and `prefetched`, for --json."""
        return {**vars(self), "prefetched": self.prefetched}


@dataclass(frozen=True)
class TaskResult:
    id: int
    state: str  # completed, dead, cancelled; or pending, buffered, running while it is live
    attempt: int | None
    result: bytes | None
    error: str | None


class ResultWait:
    """Waiting for a task to end, for Client.result and AsyncClient.result (which sleeps on the
    event loop): ask again after 1 ms, then half as long again each time, up to 100 ms."""

    def __init__(self, task_id: int, timeout: float | None) -> None:
        self._task_id, self._timeout = task_id, timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._pause = 0.001

    def pause(self, info: TaskResult) -> float | None:
        """None once `info` is final; else how long to sleep before looking again."""
        if info.state in FINAL_STATES:
            return None
        if info.state is None:
            raise BrokerError("unknown", f"no task {self._task_id}")
        pause = self._pause
        if self._deadline is not None and time.monotonic() + pause > self._deadline:
            raise TimeoutError(f"task {self._task_id} is still {info.state} after {self._timeout:g}s")
        self._pause = min(pause * 1.5, 0.1)
        return pause


class Client:
    """Talks to brokers over ZeroMQ. A submit returns only after the broker committed the task.

    Thread-safe: each thread gets sockets of its own, so threads' requests run concurrently (and
    land in the same group commits)."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout: float = 10.0,
        gossip: Sequence[str] = (),
        retry_submits: bool = True,
        liveness: float = LIVENESS,
        curve: ClientCurve | None = None,
    ) -> None:
        """`endpoints`: brokers to start from; with gossip (given, or advertised by the brokers)
        the client spreads requests over the live brokers it hears of. `retry_submits`: name each
        submit with a random key, so one that timed out can be retried on another broker without
        creating a duplicate (a batch costs one key row; a lone task gets a task key instead).
        `timeout` bounds a request; a broker that goes quiet for two `liveness` intervals (or
        drops the connection) is given up on sooner, and a keyed request goes to the next.
        `curve`: this client's keypair and the brokers' key (by default from CONDUIT_CURVE_SECRET
        and CONDUIT_CURVE_SERVER when set; README, Security)."""
        self._endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self._endpoints:
            raise ValueError("give at least one broker endpoint")
        for endpoint in [*self._endpoints, *gossip]:
            check_endpoint(endpoint)
        self._ctx = client_context(curve or ClientCurve.load())
        self._timeout = timeout
        self._liveness = liveness
        self._retry_submits = retry_submits
        self._local = threading.local()
        self._all: list[Channel] = []
        self._lock = threading.Lock()
        self._mesh = Mesh(self._ctx, self._endpoints, list(gossip))
        self._asked_pub = False

    def _channel(self, endpoint: str) -> Channel:
        channels: dict[str, Channel] = self._local.__dict__.setdefault("channels", {})
        if endpoint not in channels:
            channels[endpoint] = Channel(self._ctx, endpoint, self._liveness)
            with self._lock:
                self._all.append(channels[endpoint])
        return channels[endpoint]

    def _order(self, submitting: list[str] | None = None) -> list[str]:
        """Live brokers from gossip (for a submit, those with workers on its queues first; random
        among equals), then the configured ones."""
        with self._lock:
            self._mesh.update()
            return self._mesh.rank([]) if submitting is None else self._mesh.rank_for_submit(submitting)

    def brokers(self) -> list[BrokerView]:
        """The live brokers and their queue depths, as gossip last told."""
        with self._lock:
            self._mesh.update()
            return self._mesh.live()

    def close(self) -> None:
        """Close every thread's sockets; call it once no thread uses the client any more."""
        with self._lock:
            for channel in self._all:
                channel.close()
            self._all.clear()
            self._mesh.close()
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        command: Command,
        body: dict[str, Any],
        *,
        retry_safe: bool,
        submitting: list[str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Ask the brokers in turn, each within the timeout; move on after a timeout only when
        repeating cannot duplicate."""
        errors = []
        for endpoint in self._order(submitting):
            channel = self._channel(endpoint)
            try:
                reply = channel.request(command, body, timeout or self._timeout).body
            except BrokerTimeout as exc:
                errors.append(str(exc))
                with self._lock:
                    self._mesh.suspect(endpoint)
                if not retry_safe and not isinstance(exc, NotConnected):  # unsent: safe to move on
                    raise BrokerTimeout(
                        f"{exc}; the request may or may not have been carried out "
                        "(give tasks an idempotency key so that a retry is safe)"
                    ) from None
            except BrokerError as exc:
                # Refused before any write: safe anywhere. A failed write may have committed.
                if exc.code not in MOVE_ON and not (exc.code == "unavailable" and retry_safe):
                    raise
                errors.append(str(exc))
                if exc.code in ("shutting_down", "bad_version"):
                    with self._lock:
                        self._mesh.suspect(endpoint)
            else:
                if not self._asked_pub:  # brokers name their gossip endpoints: join them
                    self._learn_gossip()
                return reply
        raise BrokerTimeout("no broker could serve the request: " + "; ".join(errors))

    def _learn_gossip(self) -> None:
        """Ask every configured broker (once) for its gossip endpoint and its peers', to hear the
        whole mesh."""
        self._asked_pub = True
        for endpoint in self._endpoints:
            try:
                pong = self._channel(endpoint).request(Command.PING, {}, min(self._timeout, 1.0)).body
            except ConduitError:
                continue  # not there now: its gossip is not heard, unless given or named by a peer
            with self._lock:
                self._mesh.learn(pong)

    @overload
    def submit(self, target: Task[P, R], /, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]: ...
    @overload
    def submit(self, target: str, payload: bytes, /, **options: Any) -> int: ...
    def submit(self, target: Task[Any, Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        """`submit(task, *args, **kwargs)`: call a task (conduit.client.task) by name with these
        arguments, with the task's defaults (`task.options(...)` for others); returns a handle
        whose result() waits for its return value. `submit(queue, payload, **options)`: one task
        of raw bytes; options are TaskSpec's (priority, delay, max_attempts, key, ...); returns
        its id."""
        if isinstance(target, Task):
            spec = TaskSpec(target.queue, target.payload(args, kwargs), **target.policy())
            return TaskHandle(self.submit_many([spec])[0], target, self)
        if len(args) != 1:
            raise TypeError("submit(queue, payload, **options) takes one payload of bytes")
        (payload,) = args
        key = kwargs.pop("key", None)
        return self.submit_many([TaskSpec(target, payload, idempotency_key=key, **kwargs)])[0]

    def map(self, task: Task[..., R], calls: Iterable[Sequence[Any]]) -> list[TaskHandle[R]]:
        """Call a task once per sequence of positional arguments, submitted in batches as columns."""
        payloads = [task.payload(tuple(args), {}) for args in calls]
        options = {name: value for name, value in task.policy().items() if value is not None}
        ids = self.submit_batch(task.queue, payloads, **options)
        return [TaskHandle(i, task, self) for i in ids]

    def submit_many(self, tasks: Iterable[TaskSpec]) -> list[int]:
        """Enqueue many tasks, up to MAX_BATCH to a message, each batch in one commit."""
        specs = list(tasks)
        ids: list[int] = []
        for start in range(0, len(specs), MAX_BATCH):
            ids += self._submit(submit_body(specs[start : start + MAX_BATCH]))
        return ids

    def submit_batch(self, queue: str, payloads: Sequence[bytes], **options: Any) -> list[int]:
        """Enqueue one task per payload, as columns: no record per task. Each option (TaskSpec's
        fields) is one value for every task, or a sequence with one per payload (None: default)."""
        ids: list[int] = []
        for start in range(0, len(payloads), MAX_BATCH):
            end = start + MAX_BATCH
            body = {name: _rows(value, start, end) for name, value in options.items()}
            ids += self._submit({**body, "queue": queue, "payload": list(payloads[start:end])})
        return ids

    def _submit(self, body: dict[str, Any]) -> list[int]:
        """One SUBMIT, named by a key of its own when it may be retried elsewhere."""
        rows = len(body["payload"])
        if self._retry_submits and rows > 1:
            body["key"] = uuid.uuid4().hex
        elif self._retry_submits and body.get("idempotency_key") is None:
            body["idempotency_key"] = uuid.uuid4().hex  # one statement, where a submit key costs three
        key = body.get("idempotency_key")
        keyed = "key" in body or (key is not None and (isinstance(key, str) or None not in key))
        queue = body["queue"]
        queues = [queue] if isinstance(queue, str) else list(dict.fromkeys(queue))
        return list(self._request(Command.SUBMIT, body, retry_safe=keyed, submitting=queues)["ids"])

    def lookup(self, ids: Sequence[int]) -> list[TaskResult]:
        reply = self._request(Command.RESULT, {"ids": list(ids)}, retry_safe=True)
        columns = (reply[name] for name in ("id", "state", "attempt", "result", "error"))
        return list(map(TaskResult, *columns))

    def result(self, task_id: int, timeout: float | None = None) -> TaskResult:
        """Wait until the task ends (completed, dead or cancelled) and return how it ended."""
        wait = ResultWait(task_id, timeout)
        while (pause := wait.pause(info := self.lookup([task_id])[0])) is not None:
            time.sleep(pause)
        return info

    def cancel(self, task_id: int) -> bool:
        """Cancel a live task; False if it had already ended."""
        reply = self._request(Command.CANCEL, {"ids": [task_id]}, retry_safe=True)
        return reply["outcomes"][0] == "ok"

    def cancel_many(self, ids: Sequence[int]) -> list[str]:
        """Cancel live tasks; per task `ok`, or why not (`finished`, `cancelled`, `unknown`)."""
        return self._outcomes(Command.CANCEL, ids)

    def retry(self, ids: Sequence[int]) -> list[str]:
        """Dead or cancelled tasks back to pending, failures forgiven; per task `ok`, or why not
        (`live`: it has not ended, `finished`: it completed, `unknown`). Safe to repeat."""
        return self._outcomes(Command.RETRY, ids)

    def _outcomes(self, command: Command, ids: Sequence[int]) -> list[str]:
        outcomes: list[str] = []
        for start in range(0, len(ids), MAX_BATCH):
            body = {"ids": list(ids[start : start + MAX_BATCH])}
            outcomes += self._request(command, body, retry_safe=True)["outcomes"]
        return outcomes

    def workers(self, timeout: float = 1.0) -> list[WorkerSeen]:
        """The workers every reachable broker heard in the last minute (live brokers from gossip,
        and the configured ones); a broker that does not answer within `timeout` is left out, and
        if none does, BrokerTimeout says why."""
        seen: list[WorkerSeen] = []
        for endpoint, body in self._ask_all(Command.WORKERS, timeout):
            columns = [body[name] for name in ("worker", "peer", "queues", "polls", "holding", "heard")]
            # An older broker sends no host, pid, concurrency or running.
            extra = ("host", "pid", "concurrency", "running")
            columns += [body.get(name) or [None] * len(columns[0]) for name in extra]
            seen += [WorkerSeen(str(body["broker"]), endpoint, *row) for row in zip(*columns, strict=True)]
        return seen

    def stats(self, timeout: float = 1.0) -> list[BrokerStats]:
        """What every reachable broker counts, from its memory (conduit.client.stats): one object
        per broker that answered within `timeout`; BrokerTimeout if none did."""
        return [parse_stats(endpoint, body) for endpoint, body in self._ask_all(Command.STATS, timeout)]

    def _ask_all(self, command: Command, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        """Ask every live broker (from gossip) and every configured one, each once."""
        answers: list[tuple[str, dict[str, Any]]] = []
        errors: list[str] = []
        endpoints = list(dict.fromkeys(self._order()))
        for endpoint in endpoints:
            try:
                answers.append((endpoint, self._channel(endpoint).request(command, {}, timeout).body))
            except ConduitError as exc:
                errors.append(str(exc))
        if len(errors) == len(endpoints):
            raise BrokerTimeout("no broker answered: " + "; ".join(errors))
        return answers

    def queues(self) -> dict[str, dict[str, int]]:
        """Per queue, tasks by state, from the counters (cheap on any backlog)."""
        reply = self._request(Command.QUEUES, {}, retry_safe=True)
        stats: dict[str, dict[str, int]] = {}
        for queue, state, n in zip(reply["queue"], reply["state"], reply["count"], strict=True):
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
        """A page of tasks, as `conduit tasks list` shows them: live ones by id, pending ones in
        the order they run, finished ones newest first; `Page.next` is the next page's `after`."""
        body = {"queue": queue, "state": state, "older_than": older_than, "newer_than": newer_than}
        reply = self._request(Command.LIST, {**body, "limit": limit, "after": after}, retry_safe=True)
        return Page(records(TaskRow, reply), reply["next"])

    def show(self, ids: Sequence[int]) -> list[TaskDetail]:
        """All that is kept about each task found, in the order of `ids` (unknown ones left out)."""
        details: list[TaskDetail] = []
        todo = list(dict.fromkeys(ids))
        while todo:  # a few ids a request, and fewer when their payloads are big (`rest`)
            reply = self._request(Command.SHOW, {"ids": todo[:MAX_SHOW]}, retry_safe=True)
            details += records(TaskDetail, reply)
            todo = list(reply.get("rest") or ()) + todo[MAX_SHOW:]
        return details

    def redrive(self, queue: str, timeout: float = 300.0) -> int:
        """Every dead task of `queue` back to pending, failures forgiven; returns how many."""
        return self._operate(Command.REDRIVE, queue, timeout)

    def purge(self, queue: str, timeout: float = 300.0) -> int:
        """Cancel every task of `queue` that has not started (see `conduit queues purge`); returns
        how many. Purged tasks are kept as cancelled: `retry` brings one back."""
        return self._operate(Command.PURGE, queue, timeout)

    def _operate(self, command: Command, queue: str, timeout: float) -> int:
        """A long operation gets a timeout of its own; repeating it elsewhere is harmless."""
        check_queue_name(queue)
        reply = self._request(command, {"queue": queue}, retry_safe=True, timeout=timeout)
        return int(reply["count"])

    def pause(self, queue: str) -> bool:
        """Stop every broker delivering `queue` (within about a second; durable, until `resume`).
        Submits to it are still taken and kept; tasks already delivered run on. False if it was
        paused already."""
        return self._pause(Command.PAUSE, queue)

    def resume(self, queue: str) -> bool:
        """Deliver a paused queue again, at once; False if it was not paused."""
        return self._pause(Command.RESUME, queue)

    def _pause(self, command: Command, queue: str) -> bool:
        check_queue_name(queue)
        return self._request(command, {"queue": queue}, retry_safe=True)["outcomes"] == ["ok"]

    def ping(self) -> str:
        return str(self._request(Command.PING, {}, retry_safe=True)["broker"])


def _rows(value: Any, start: int, end: int) -> Any:
    """An option's share of one message: its slice if it has a value per task, else itself."""
    return list(value[start:end]) if isinstance(value, Sequence) and not isinstance(value, str) else value


__all__ = ["BrokerError", "BrokerStats", "BrokerTimeout", "Client", "TaskResult", "WorkerSeen"]
