"""What the broker's core (conduit/broker/core.py, no I/O) costs a task through a burst.

    python bench/core_cost.py [--rounds 200] [--batch 500] [--profile]

Each round is one SUBMIT of `batch` tasks to a queue a worker is polling, its commit (inserted
held), the worker's POLL answered from the buffer, and its COMPLETE and that commit: the events
a burst brings, fed to the pure state machine as the shell would (messages framed as on the
wire). The figure is CPU on the broker's main thread per task (process time, best of 3), so it
depends on the machine but not on its load; `--profile` adds cProfile's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from datetime import UTC, datetime
from typing import Any

from conduit.broker import core
from conduit.broker.core import Config, Core
from conduit.broker.events import Acquired, Leased, Received, Written
from conduit.broker.writes import WriteResult
from conduit.store import BrokerLease
from conduit.task import LeasedTask, Outcome, Submitted
from conduit.wire import REPLIES, Command, decode, encode

WORKER, CLIENT = b"worker", b"client"


class Burst:
    def __init__(self, batch: int) -> None:
        self.core = Core(Config(broker_id="b1", buffer_size=10 * batch))
        self.core.handle(Acquired(BrokerLease("b1", 1), 0.0))
        self.payloads = [b"x" * 64] * batch
        self.batch = batch
        self.now = 0.0
        self.rid = 0
        self.next_id = 10
        # A poll served from a read that came back short: the queue is wanted here, and drained.
        self._request(WORKER, "POLL", worker="w1", queues=["q"], max=1, timeout=5.0)
        task = LeasedTask(1, "q", 0, datetime.now(UTC), 1, 0, 5, 30.0, b"x")
        self.core.handle(Leased("q", [task], None, 0.0))

    def _request(self, peer: bytes, command: str, **body: Any) -> list[core.Action]:
        self.rid += 1
        return self.core.handle(Received(peer, encode(Command(command), {"rid": self.rid, **body}), self.now))

    def _write(self, actions: list[core.Action]) -> core.Write:
        (write,) = [a for a in actions if isinstance(a, core.Write)]
        return write

    def round(self) -> int:
        self.now += 0.001
        write = self._write(self._request(CLIENT, "SUBMIT", queue="q", payload=self.payloads))
        (op,) = write.batch.submits
        submitted = [Submitted(self.next_id + i, True, owned) for i, owned in enumerate(op.owned)]
        self.next_id += len(submitted)
        self.core.handle(Written(write.batch, WriteResult([submitted], []), None, self.now))
        actions = self._request(WORKER, "POLL", worker="w1", queues=["q"], max=self.batch, timeout=5.0)
        (deliver,) = [a for a in actions if isinstance(a, core.Send) and a.peer == WORKER]
        body = decode(deliver.frames, allowed=REPLIES).body
        ids, attempts = body["id"], body["attempt"]
        elapsed = [0.001] * len(ids)
        write = self._write(self._request(WORKER, "COMPLETE", id=ids, attempt=attempts, elapsed=elapsed))
        self.core.handle(Written(write.batch, WriteResult([], [[Outcome.OK] * len(ids)]), None, self.now))
        return len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top 20 functions")
    args = parser.parse_args()
    burst = Burst(args.batch)
    for _ in range(5):  # warm up
        burst.round()
    best = float("inf")
    for _ in range(3):
        began = time.process_time()
        tasks = sum(burst.round() for _ in range(args.rounds))
        best = min(best, (time.process_time() - began) / tasks)
    print(f"{best * 1e6:.2f} µs a task through the core ({args.rounds} rounds of {args.batch})")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [burst.round() for _ in range(args.rounds)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
