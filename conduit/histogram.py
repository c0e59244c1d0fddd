"""Fixed-bucket histograms, cheap enough for the hot path: an add is a bisect and two additions.

Values go into fine buckets (about 1.5x apart), so that a quantile read from them (STATS' p50 and
p99) is within a bucket's width; /metrics exports a coarser subset of the same bounds, which is
exact, since a cumulative count at a bound is the same whichever other bounds exist. A batch of
tasks that share a value (one submit's tasks delivered together) is one add with a weight.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from functools import partial

SECONDS: tuple[float, ...] = (
    *(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075),
    *(0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0),
    *(60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
)
# The bounds /metrics shows (a subset of SECONDS).
EXPORTED_SECONDS: tuple[float, ...] = (
    *(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
    3600.0,
)
SIZES: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 250, 500, 1000, 2500, 10000)


class Histogram:
    """Counts per bucket (`le` bounds, and one more for +Inf) and the sum of the values."""

    __slots__ = ("_bucket", "bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = SECONDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self._bucket = partial(bisect_left, bounds)

    def add(self, value: float, n: int = 1) -> None:
        self.counts[self._bucket(value)] += n
        self.sum += value * n

    def add_all(self, values: Iterable[float]) -> None:
        """Many values at once: sorted (in C), then cut at the bounds, a bisect each, so a batch
        costs its sort and a few dozen bisects, not a call per value."""
        ordered = sorted(values)
        counts, below = self.counts, 0
        for i, bound in enumerate(self.bounds):
            if below == len(ordered):
                break
            upto = bisect_right(ordered, bound, below)
            counts[i] += upto - below
            below = upto
        counts[-1] += len(ordered) - below
        self.sum += sum(ordered)

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def clear(self) -> None:
        self.counts = [0] * len(self.counts)
        self.sum = 0.0

    def copy(self) -> Histogram:
        h = Histogram(self.bounds)
        h.counts, h.sum = list(self.counts), self.sum
        return h

    def __repr__(self) -> str:
        return f"Histogram({self.counts}, {self.sum})"

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self, bounds: tuple[float, ...]) -> list[tuple[float, int]]:
        """(bound, values at most it) at each of `bounds` (a subset of ours), then +Inf."""
        out: list[tuple[float, int]] = []
        running = 0
        wanted = iter(bounds)
        want = next(wanted, None)
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            if want is not None and bound == want:
                out.append((bound, running))
                want = next(wanted, None)
        out.append((float("inf"), running + self.counts[-1]))
        return out

    def quantile(self, q: float) -> float | None:
        """The q-quantile, interpolated within its bucket; None with no values."""
        total = self.count
        if not total:
            return None
        rank = q * total
        seen = 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                low = self.bounds[i - 1] if i else 0.0
                high = self.bounds[i] if i < len(self.bounds) else low
                return low + (high - low) * max(0.0, rank - seen) / n
            seen += n
        return self.bounds[-1]


class Recent:
    """A histogram of the last `span` seconds, as `slots` slices of it: each slice is emptied when
    its turn comes again, so reading it costs the slices, never the values."""

    __slots__ = ("_hist", "_numbers", "_width")

    def __init__(self, span: float = 60.0, slots: int = 6) -> None:
        self._width = span / slots
        self._numbers = [-1] * slots  # which slice of time each holds
        self._hist = [Histogram() for _ in range(slots)]

    def add(self, now: float, value: float, n: int = 1) -> None:
        number = int(now // self._width)
        i = number % len(self._hist)
        if self._numbers[i] != number:
            self._numbers[i] = number
            self._hist[i].clear()
        self._hist[i].add(value, n)

    def __repr__(self) -> str:
        return f"Recent({list(zip(self._numbers, self._hist, strict=True))})"

    def merged(self, now: float) -> Histogram:
        """The values of the last span (the current slice counted whole)."""
        number = int(now // self._width)
        out = Histogram()
        for slice_number, hist in zip(self._numbers, self._hist, strict=True):
            if number - len(self._hist) < slice_number <= number:
                out.merge(hist)
        return out
