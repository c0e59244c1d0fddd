"""Producers: submit tasks continuously and record exactly which submits were acknowledged.

Every task carries an idempotency key the producer chose (as Client's automatic keys, but known
here), so a submit that raised yet committed is recognised at the end, neither lost nor a
duplicate, and a failed batch is retried with the same keys.

The mix was made for 40 tasks a second (BASE_RATE). At higher rates the mesh does the same work
a second, not more: submits grow instead of coming more often (default_batch), and each task
works proportionally less (`work`): long tasks come as often a second as at the base rate, and
the others hardly sleep. What a producer submitted is kept as columns, a few bytes a task, so a
15-minute run at 2,000 tasks a second (1.8M tasks) costs tens of megabytes, not an object each."""

from __future__ import annotations

import json
import random
import threading
import time
from array import array
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from conduit.client import Client
from conduit.errors import ConduitError
from conduit.task import TaskSpec

LEASE_TIMEOUT = 6.0  # longer than a short worker pause, shorter than a long one
MAX_ATTEMPTS = 25  # crashes count as failures; permanent failures end a task at once
BASE_RATE = 40.0  # tasks a second over all producers that the mix below was made for
MAX_BATCH = 8  # at the base rate a submit takes 1 to 8 tasks


def default_batch(rate: float) -> int:
    """The largest submit at `rate`: 8 up to the base rate, then growing with it (400 at 2,000/s),
    so producers submit as often as at the base rate."""
    return max(MAX_BATCH, round(MAX_BATCH * rate / BASE_RATE))


@dataclass(slots=True)
class Submitted:
    """One task the producer tried to submit, as the checker reads it."""

    key: str
    queue: str
    delay: float
    mode: int  # 0 normal, 1 fails its first run, 2 fails permanently
    sent: float = 0.0  # wall clock of the first try: the task's run_at is no earlier than sent+delay
    id: int | None = None  # set once a submit of it was acknowledged


@dataclass(frozen=True)
class Latency:
    """How long one batch took from its first try to its acknowledgment, retries included: the
    wait a producer's caller sees."""

    producer: str
    sent: float  # wall clock of the first try
    seconds: float
    tasks: int


class Producer(threading.Thread):
    """Submits batches of 1..max_batch tasks at about `rate` tasks a second, paced from a
    schedule, so a submit's own time does not slow the rate. By default an open loop, as producers
    that do not wait for the queue: batches come at random (Poisson) times, and those a stall
    delayed go at once when it ends. `steady`: one batch every mean interval, never catching up,
    so a producer stuck on a broker submits nothing more (what the liveness shapes measure)."""

    def __init__(
        self,
        label: str,
        endpoints: list[str],
        rng: random.Random,
        rate: float,
        queues: tuple[str, ...],
        max_batch: int = MAX_BATCH,
        steady: bool = False,
        work: float = 1.0,
        place: Callable[[], AbstractContextManager[None]] = nullcontext,
    ) -> None:
        """`work`: the share of the base mix's handler time each task asks for (1 at 40/s).
        `place`: where its Client's sockets live (a host of a Network: `Network.enter`)."""
        super().__init__(name=label, daemon=True)
        self.label, self.endpoints, self.rng = label, endpoints, rng
        self.rate, self.queues, self.max_batch, self.steady = rate, queues, max_batch, steady
        self.work = work
        self.place = place
        # Task n (from 1) is key f"{label}-{n}"; its other fields are columns at index n - 1.
        self.queue_of = array("b")
        self.delays = array("d")
        self.modes = array("b")
        self.sent = array("d")
        self.ids = array("q")  # 0 until a submit of it was acknowledged
        self.acknowledged = 0
        self.latencies: list[Latency] = []  # acknowledged batches only
        self.attempts = 0
        self.failures: list[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(120)

    def submitted(self) -> list[Submitted]:
        """Every task tried, for the checker (call once the producer stopped)."""
        return [
            Submitted(f"{self.label}-{i + 1}", self.queues[q], d, m, s, n or None)
            for i, (q, d, m, s, n) in enumerate(
                zip(self.queue_of, self.delays, self.modes, self.sent, self.ids, strict=True)
            )
        ]

    def _task(self) -> tuple[int, float, int]:
        """A new task: its queue (an index), delay and mode, appended to the columns."""
        roll = self.rng.random()
        mode = 2 if roll < 0.02 else 1 if roll < 0.07 else 0
        delay = round(self.rng.uniform(0.2, 4.0), 3) if self.rng.random() < 0.1 else 0.0
        queue = self.queues.index(self.rng.choice(self.queues))
        self.queue_of.append(queue)
        self.delays.append(delay)
        self.modes.append(mode)
        self.sent.append(0.0)
        self.ids.append(0)
        return queue, delay, mode

    def _spec(self, n: int, queue: int, delay: float, mode: int) -> TaskSpec:
        roll = self.rng.random()
        long = roll < 0.02 * self.work
        seconds = self.rng.uniform(1.0, 4.0) if long else self.rng.uniform(0.0, 0.06 * self.work)
        payload = json.dumps({"s": round(seconds, 4), "f": mode}).encode()
        return TaskSpec(
            self.queues[queue],
            payload,
            delay=delay,
            idempotency_key=f"{self.label}-{n}",
            lease_timeout=LEASE_TIMEOUT,
            max_attempts=MAX_ATTEMPTS,
            backoff_base=0.2,
            backoff_max=2.0,
        )

    def run(self) -> None:
        batches_per_second = self.rate / ((self.max_batch + 1) / 2)
        due = time.monotonic()
        with self.place(), Client(self.endpoints, timeout=5.0) as client:
            while not self._halt.is_set():
                size = self.rng.randint(1, self.max_batch)
                first = len(self.ids)  # index of the batch's first task
                batch = [self._task() for _ in range(size)]
                specs = [self._spec(first + i + 1, *task) for i, task in enumerate(batch)]
                for attempt in range(3):  # a real producer retries; the keys make it safe
                    now = time.time()
                    if not attempt:
                        self.sent[first:] = array("d", [now] * size)
                    self.attempts += 1
                    try:
                        ids = client.submit_many(specs)
                    except ConduitError as exc:
                        self.failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                        if self._halt.wait(0.5 * (attempt + 1)):
                            break
                        continue
                    sent = self.sent[first]
                    self.latencies.append(Latency(self.label, sent, time.time() - sent, size))
                    self.ids[first:] = array("q", ids)
                    self.acknowledged += size
                    break
                gap = 1 / batches_per_second if self.steady else self.rng.expovariate(batches_per_second)
                due = max(due + gap, time.monotonic()) if self.steady else due + gap
                self._halt.wait(due - time.monotonic())
