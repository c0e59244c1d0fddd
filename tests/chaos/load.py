"""Producers: submit tasks continuously and record exactly which submits were acknowledged.

Every task carries an idempotency key the producer chose (as Client's automatic keys, but known
here), so a submit that raised yet committed is recognised at the end, neither lost nor a
duplicate, and a failed batch is retried with the same keys."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass

from conduit.client import Client
from conduit.errors import ConduitError
from conduit.task import TaskSpec

LEASE_TIMEOUT = 6.0  # longer than a short worker pause, shorter than a long one
MAX_ATTEMPTS = 25  # crashes count as failures; permanent failures end a task at once


@dataclass
class Submitted:
    """One task the producer tried to submit."""

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


class Producer(threading.Thread):
    """Submits batches of 1..max_batch tasks at about `rate` tasks a second: at random intervals,
    or, `steady`, one batch every mean interval after the last was acknowledged."""

    def __init__(
        self,
        label: str,
        endpoints: list[str],
        rng: random.Random,
        rate: float,
        queues: tuple[str, ...],
        max_batch: int = 8,
        steady: bool = False,
    ) -> None:
        super().__init__(name=label, daemon=True)
        self.label, self.endpoints, self.rng = label, endpoints, rng
        self.rate, self.queues, self.max_batch, self.steady = rate, queues, max_batch, steady
        self.tasks: list[Submitted] = []
        self.latencies: list[Latency] = []  # acknowledged batches only
        self.attempts = 0
        self.failures: list[str] = []
        self._halt = threading.Event()
        self._n = 0

    def stop(self) -> None:
        self._halt.set()
        self.join(120)

    def _task(self) -> Submitted:
        self._n += 1
        roll = self.rng.random()
        mode = 2 if roll < 0.02 else 1 if roll < 0.07 else 0
        delay = round(self.rng.uniform(0.2, 4.0), 3) if self.rng.random() < 0.1 else 0.0
        return Submitted(f"{self.label}-{self._n}", self.rng.choice(self.queues), delay, mode)

    def _spec(self, task: Submitted) -> TaskSpec:
        roll = self.rng.random()
        seconds = self.rng.uniform(1.0, 4.0) if roll < 0.02 else self.rng.uniform(0.0, 0.06)
        payload = json.dumps({"s": round(seconds, 4), "f": task.mode}).encode()
        return TaskSpec(
            task.queue,
            payload,
            delay=task.delay,
            idempotency_key=task.key,
            lease_timeout=LEASE_TIMEOUT,
            max_attempts=MAX_ATTEMPTS,
            backoff_base=0.2,
            backoff_max=2.0,
        )

    def run(self) -> None:
        with Client(self.endpoints, timeout=5.0) as client:
            while not self._halt.is_set():
                size = self.rng.randint(1, self.max_batch)
                batch = [self._task() for _ in range(size)]
                specs = [self._spec(t) for t in batch]
                self.tasks.extend(batch)
                for attempt in range(3):  # a real producer retries; the keys make it safe
                    now = time.time()
                    for t in batch:
                        t.sent = t.sent or now
                    self.attempts += 1
                    try:
                        ids = client.submit_many(specs)
                    except ConduitError as exc:
                        self.failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                        if self._halt.wait(0.5 * (attempt + 1)):
                            break
                        continue
                    self.latencies.append(Latency(self.label, batch[0].sent, time.time() - batch[0].sent))
                    for t, task_id in zip(batch, ids, strict=True):
                        t.id = task_id
                    break
                batches_per_second = self.rate / ((self.max_batch + 1) / 2)
                self._halt.wait(
                    1 / batches_per_second if self.steady else self.rng.expovariate(batches_per_second)
                )
