"""Small inline SVG charts, drawn on the server: no chart library, no script, nothing to load."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT, PAD = 240, 48, 2


def bins(
    series: Sequence[tuple[float, float, float]], now: float, span: float, count: int
) -> list[list[float]]:
    """The average of each column (in/s and out/s, or p50 and p99) per bin of `span / count`
    seconds, oldest first, ending at `now`; a bin with no reading is empty (a gap, not a 0)."""
    width = span / count
    sums = [[0.0, 0.0, 0] for _ in range(count)]
    for t, rate_in, rate_out in series:
        i = int((t - (now - span)) // width)
        if 0 <= i < count:
            sums[i][0] += rate_in
            sums[i][1] += rate_out
            sums[i][2] += 1
    return [[s[0] / s[2], s[1] / s[2]] if s[2] else [] for s in sums]


def sparkline(
    values: Sequence[Sequence[float]], labels: tuple[str, str], title: str, unit: str = "/s"
) -> str:
    """Two lines (in and out per second, or p50 and p99) over the bins; an empty bin leaves a
    gap. The scale is the largest value, written below."""
    top = max((v for pair in values for v in pair), default=0.0)
    if not any(values):
        return _empty(title, "no readings yet")
    scale = top or 1.0
    step = (WIDTH - 2 * PAD) / max(len(values) - 1, 1)
    paths = []
    for k, css in enumerate(("in", "out")):
        runs: list[list[str]] = [[]]
        for i, pair in enumerate(values):
            if not pair:
                runs.append([])
                continue
            x = PAD + i * step
            y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * pair[k] / scale
            runs[-1].append(f"{x:.1f},{y:.1f}")
        for run in runs:
            if len(run) == 1:  # a lone reading: a dot, since a line needs two
                cx, cy = run[0].split(",")
                paths.append(f'<circle class="{css}" cx="{cx}" cy="{cy}" r="1.5"/>')
            elif run and k == 0:  # the first series as an area, so that the second shows on it
                base = f"{HEIGHT - PAD}"
                ends = f"{run[-1].split(',')[0]},{base} {run[0].split(',')[0]},{base}"
                paths.append(f'<polygon class="{css}" points="{" ".join(run)} {ends}"/>')
            elif run:
                paths.append(f'<polyline class="{css}" points="{" ".join(run)}"/>')
    legend = (
        f'<text x="{PAD}" y="{HEIGHT + 10}"><tspan class="in">{escape(labels[0])}</tspan> / '
        f'<tspan class="out">{escape(labels[1])}</tspan>, max {top:,.1f}{escape(unit)}</text>'
    )
    return _svg(title, "".join(paths) + legend)


def _svg(title: str, body: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT + 12}" width="{WIDTH}" height="{HEIGHT + 12}" '
        f'role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>'
        f'<rect class="frame" x="0" y="0" width="{WIDTH}" height="{HEIGHT}"/>{body}</svg>'
    )


def _empty(title: str, note: str) -> str:
    middle = f'x="{WIDTH / 2}" y="{HEIGHT / 2 + 4}" text-anchor="middle"'
    return _svg(title, f'<text {middle} class="note">{escape(note)}</text>')


def unmeasured(title: str) -> str:
    """The frame of a chart with no source yet: "-", never made-up numbers."""
    return _empty(title, "-")
