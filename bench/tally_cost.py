"""What the broker's tally (conduit/broker/tally.py) costs a task, call by call, on 500-task batches.

    python bench/tally_cost.py

Each figure is the best of 5 repeats of 2,000 calls (timeit), divided by the batch: CPU on the
broker's main thread per task, for a submit's commit, a COMPLETE's `elapsed` check and commit, and
a delivery from the buffer and by sync match. The tally is always on; --metrics adds only a copy
of it once a second.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from conduit.broker.tally import Tally
from conduit.broker.writes import RequestOp, SubmitOp, WriteBatch, WriteResult
from conduit.task import Completion, LeasedTask, Outcome, Submitted, TaskSpec
from conduit.wire import Command, decode, encode, parse_elapsed

BATCH = 500


def per_task(call: Callable[[], object]) -> float:
    """Microseconds a task."""
    return min(timeit.repeat(call, number=2000, repeat=5)) / 2000 / BATCH * 1e6


def main() -> None:
    tally = Tally()
    submit = WriteBatch(
        submits=[SubmitOp(b"c", 1, [TaskSpec("q", b"x")] * BATCH, [None] * BATCH, [True] * BATCH)]
    )
    submitted = WriteResult([[Submitted(i, True, True) for i in range(BATCH)]], [])
    elapsed = [0.00123] * BATCH
    complete = WriteBatch(
        ops=[RequestOp(b"w", 2, "complete", [Completion(i, 1) for i in range(BATCH)], list(elapsed))]
    )
    completed = WriteResult([], [[Outcome.OK] * BATCH], {"completed": {"q": BATCH}})
    report = decode(
        encode(Command.COMPLETE, {"rid": 1, "id": [1] * BATCH, "attempt": [1] * BATCH, "elapsed": elapsed})
    )
    due = datetime.now(UTC)
    buffered = [LeasedTask(i, "q", 0, due, 1, 0, 5, 30.0, b"x") for i in range(BATCH)]
    # read back from the database, each due at its own time (submitted one by one, or retried)
    read_back = [
        LeasedTask(i, "q", 0, due + timedelta(microseconds=i), 1, 0, 5, 30.0, b"x") for i in range(BATCH)
    ]
    rows = [(i, 1, "q", b"x", 0, 0, 5, 30.0) for i in range(BATCH)]
    figures = {
        "a submit's commit": per_task(lambda: tally.committed(submit, submitted, 0.001)),
        "COMPLETE's elapsed, checked": per_task(lambda: parse_elapsed(report, BATCH)),
        "a COMPLETE's commit": per_task(lambda: tally.committed(complete, completed, 0.001)),
        "a delivery from the buffer": per_task(lambda: tally.delivered_buffered(buffered, 1.0)),
        "... each due at its own time": per_task(lambda: tally.delivered_buffered(read_back, 1.0)),
        "a delivery by sync match": per_task(lambda: tally.delivered_sync(rows, 0.001, 1.0)),
    }
    for what, us in figures.items():
        print(f"{what:<30}{us:>8.3f} µs a task")
    burst = (
        figures["a submit's commit"]
        + figures["COMPLETE's elapsed, checked"]
        + figures["a COMPLETE's commit"]
        + figures["a delivery from the buffer"]
    )
    print(f"{'a burst task (all but sync)':<30}{burst:>8.3f} µs a task")


if __name__ == "__main__":
    main()
