"""The node-count-over-time chart of a cluster, as SVG geometry computed on the server.

Drawn from the node rows alone (created → terminated), stacked by group, so it needs no
metrics store and no charting script: the page stays self-contained and the chart is right
after a restart. Pure functions of plain values, so they are tested without a database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

# The plot's own coordinates. The SVG stretches to its box (preserveAspectRatio="none"), and the axis
# labels are HTML placed by percentage over it, so text stays legible from a phone to a wide screen.
WIDTH, HEIGHT = 1000, 300
PALETTE = ("#4f46e5", "#0891b2", "#16a34a", "#d97706", "#db2777", "#7c3aed", "#0d9488", "#dc2626")
# Tick spacings to choose from, smallest first: a chart gets the first that yields at most six ticks.
TICK_STEPS = tuple(timedelta(seconds=s) for s in (
    1, 2, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400,
    7 * 86400,
))
MIN_SPAN = timedelta(seconds=10)  # a younger cluster's chart is stretched to this from its creation


@dataclass(frozen=True)
class Interval:
    """One node's life: in `group` from `start` until `end` (None: still there)."""

    group: str
    start: datetime
    end: datetime | None


@dataclass(frozen=True)
class Series:
    group: str
    color: str
    points: str  # SVG polygon points of this group's band in the stack
    now: int  # nodes of this group at the right edge
    peak: int


@dataclass(frozen=True)
class Tick:
    pos: float  # x ticks: percent from the left; y ticks: percent from the top
    label: str
    y: float = 0.0  # y ticks: the grid line's height in plot coordinates


@dataclass(frozen=True)
class NodeChart:
    width: int
    height: int
    series: tuple[Series, ...]
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    summary: str  # the chart in words, for screen readers and as its description

    @property
    def empty(self) -> bool:
        return not self.series


def node_chart(intervals: list[Interval], *, start: datetime, end: datetime,
               order: list[str] | None = None) -> NodeChart:
    """Stacked node counts by group between `start` and `end`; groups in `order`, then any others by name."""
    end = max(end, start + MIN_SPAN)
    groups = list(dict.fromkeys([*(order or []), *sorted({i.group for i in intervals})]))
    groups = [g for g in groups if any(i.group == g for i in intervals)]
    # Every moment the count changes, within the window; counts are constant between two of them.
    cuts = sorted({start, end, *(t for i in intervals for t in (i.start, i.end) if t is not None and start < t < end)})
    counts = [
        {g: sum(1 for i in intervals if i.group == g and i.start <= t and (i.end is None or i.end > t)) for g in groups}
        for t in cuts[:-1]
    ]
    peak_total = max((sum(c.values()) for c in counts), default=0)
    y_max = max(1, peak_total)
    span = (end - start).total_seconds()

    def x(t: datetime) -> float:
        return round((t - start).total_seconds() / span * WIDTH, 1)

    def y(n: int) -> float:
        return round(HEIGHT - n / y_max * HEIGHT, 1)

    def x_percent(t: datetime) -> float:
        return round(x(t) / WIDTH * 100, 2)

    series = []
    below = [0] * len(counts)
    for index, group in enumerate(groups):
        above = [b + c[group] for b, c in zip(below, counts, strict=True)]
        upper = [(x(t0), y(a)) for t0, a in zip(cuts, above, strict=False)]
        upper_steps = [p for k, (px, py) in enumerate(upper) for p in ((px, py), (x(cuts[k + 1]), py))]
        lower_steps = [p for k, (px, _) in enumerate(upper) for p in ((px, y(below[k])), (x(cuts[k + 1]), y(below[k])))]
        polygon = upper_steps + lower_steps[::-1]
        series.append(Series(
            group=group,
            color=PALETTE[index % len(PALETTE)],
            points=" ".join(f"{px:g},{py:g}" for px, py in polygon),
            now=counts[-1][group] if counts else 0,
            peak=max((c[group] for c in counts), default=0),
        ))
        below = above
    y_step = next((s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500) if y_max / s <= 5), 1000)
    y_ticks = tuple(Tick(round(y(n) / HEIGHT * 100, 2), str(n), y=y(n)) for n in range(0, y_max + 1, y_step))
    return NodeChart(
        width=WIDTH, height=HEIGHT, series=tuple(series), x_ticks=_time_ticks(start, end, x_percent), y_ticks=y_ticks,
        summary=_summary(series, peak_total),
    )


def _time_ticks(start: datetime, end: datetime, x: Callable[[datetime], float]) -> tuple[Tick, ...]:
    span = end - start
    step = next((s for s in TICK_STEPS if span / s <= 6), TICK_STEPS[-1])
    fmt = "%H:%M:%S" if step < timedelta(minutes=1) else "%H:%M" if step < timedelta(days=1) else "%b %d"
    local_start = timezone.localtime(start)
    # The first multiple of the step after the start, counted in local time from midnight.
    midnight = local_start.replace(hour=0, minute=0, second=0, microsecond=0)
    first = midnight + step * -(-(local_start - midnight) // step)
    ticks = []
    t = first
    while t <= end:
        ticks.append(Tick(x(t), t.strftime(fmt)))
        t += step
    return tuple(ticks)


def _summary(series: list[Series], peak: int) -> str:
    if not series:
        return "No nodes yet."
    now = ", ".join(f"{s.group} {s.now}" for s in series)
    return f"Nodes by group since the cluster was created: now {now}; at most {peak} at once."
