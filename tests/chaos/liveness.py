"""Liveness, measured: how long producers waited for their submits, how long the whole mesh went
without starting a task, and how soon a worker got work again after a broker failed. Durability
is checked by invariants.py; these figures are the other half of the promise (docs/PROTOCOL.md
§11: every wait on a broker is bounded by about two liveness intervals)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import pairwise

from chaos.ledger import Execution


def longest_gap(starts: Iterable[float], since: float, until: float) -> tuple[float, float]:
    """The longest stretch of [since, until] in which no run started: (seconds, when it began).
    The window's ends count as starts, so a mesh that stops starting tasks at the end shows."""
    points = [since, *sorted(t for t in starts if since < t < until), until]
    return max(((b - a, a) for a, b in pairwise(points)), default=(0.0, since))


def longest_gap_outside(
    starts: Iterable[float], since: float, until: float, outages: Iterable[tuple[float, float]]
) -> tuple[float, float]:
    """As `longest_gap`, among the gaps that overlap none of `outages` (start, end): the longest
    stall while some broker could serve, where an outage is the database gone for every broker."""
    away = list(outages)
    points = [since, *sorted(t for t in starts if since < t < until), until]
    gaps = [(b - a, a) for a, b in pairwise(points) if not any(o0 <= b and a <= o1 for o0, o1 in away)]
    return max(gaps, default=(0.0, since))


def served_by(runs: Iterable[Execution], pids: set[int], broker: str, before: float) -> bool:
    """Whether the last run that one of `pids` started before `before` came from `broker`."""
    last = max((r for r in runs if r.pid in pids and r.start < before), key=lambda r: r.start, default=None)
    return last is not None and last.broker == broker


def back_to_work(
    runs: Iterable[Execution], pids: set[int], fault: tuple[float, float], broker: str, concurrency: int
) -> tuple[float, float | None]:
    """For a worker (`pids`) and a fault of `broker` lasting `fault` (start, end): how long the
    worker had old work from the start (tasks it had prefetched from `broker` and all its slots
    busy), and how long from then until it started new work (delivered by another broker, or by
    `broker` once it was back); None if it never did."""
    mine = [r for r in runs if r.pid in pids]
    start, end = fault
    old = max((r.start for r in mine if r.broker == broker and start <= r.start <= end), default=start)
    free = next(
        (
            t
            for t in sorted({old, *(r.end for r in mine if r.end is not None and r.end > old)})
            if sum(r.start <= t and (r.end is None or r.end > t) for r in mine) < concurrency
        ),
        math.inf,
    )
    new = (r.start for r in mine if r.start >= free and (r.broker != broker or r.start > end))
    first = min(new, default=None)
    return free - start, None if first is None else first - free
