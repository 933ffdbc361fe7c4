"""Server-side SVG charts: a line chart over time and a horizontal bar chart.

They are drawn here rather than in the browser so a page with JavaScript off still has
them, and so no chart library is needed. Colours come from the stylesheet (classes, no
inline styles: the Content-Security-Policy forbids them). Every chart carries a title and
a one-sentence description for screen readers; the page shows the same numbers in a table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

__all__ = ["bar_chart", "line_chart"]

Format = Callable[[float], str]


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above `value`."""
    if value <= 0:
        return 1.0
    power = 1.0
    while power * 10 <= value:
        power *= 10
    while power > value:
        power /= 10
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def line_chart(
    points: Sequence[tuple[float, float]],
    *,
    chart_id: str,
    title: str,
    fmt: Format,
    width: int = 640,
    height: int = 200,
) -> Markup:
    """`points` are (Unix time, value), oldest first."""
    left, right, top, bottom = 64, 12, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg class="chart chart-line" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{chart_id}-t {chart_id}-d" preserveAspectRatio="xMidYMid meet">',
        f'<title id="{chart_id}-t">{escape(title)}</title>',
    ]
    if len(points) < 2:
        parts.append(f'<desc id="{chart_id}-d">Not enough samples yet.</desc>')
        parts.append(
            f'<text class="chart-empty" x="{width / 2}" y="{height / 2}" '
            f'text-anchor="middle">Not enough samples yet</text></svg>'
        )
        return Markup("".join(parts))
    t0, t1 = points[0][0], points[-1][0]
    span = max(t1 - t0, 1e-9)
    values = [v for _, v in points]
    ceiling = _nice_ceiling(max(values))

    def x(t: float) -> float:
        return left + (t - t0) / span * plot_w

    def y(v: float) -> float:
        return top + plot_h - (v / ceiling) * plot_h

    description = (
        f"From {_clock(t0)} to {_clock(t1)} UTC: latest {fmt(values[-1])}, peak {fmt(max(values))}."
    )
    parts.append(f'<desc id="{chart_id}-d">{escape(description)}</desc>')
    for fraction in (0.0, 0.5, 1.0):
        gy = y(ceiling * fraction)
        parts.append(
            f'<line class="chart-grid" x1="{left}" x2="{width - right}" '
            f'y1="{_num(gy)}" y2="{_num(gy)}"/>'
        )
        parts.append(
            f'<text class="chart-label" x="{left - 6}" y="{_num(gy + 4)}" '
            f'text-anchor="end">{escape(fmt(ceiling * fraction))}</text>'
        )
    for t, anchor in ((t0, "start"), ((t0 + t1) / 2, "middle"), (t1, "end")):
        parts.append(
            f'<text class="chart-label" x="{_num(x(t))}" y="{height - 8}" '
            f'text-anchor="{anchor}">{_clock(t)}</text>'
        )
    line = " ".join(f"{_num(x(t))},{_num(y(v))}" for t, v in points)
    base = top + plot_h
    parts.append(
        f'<polygon class="chart-area" points="{_num(x(t0))},{base} {line} {_num(x(t1))},{base}"/>'
    )
    parts.append(f'<polyline class="chart-stroke" points="{line}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


def bar_chart(
    items: Sequence[tuple[str, float]],
    *,
    chart_id: str,
    title: str,
    fmt: Format,
    width: int = 640,
) -> Markup:
    """One horizontal bar per (label, value), in the given order."""
    label_w, value_w, row_h, pad = 150, 90, 28, 8
    bar_max = width - label_w - value_w
    height = max(len(items), 1) * row_h + 2 * pad
    parts = [
        f'<svg class="chart chart-bar" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{chart_id}-t {chart_id}-d" preserveAspectRatio="xMinYMin meet">',
        f'<title id="{chart_id}-t">{escape(title)}</title>',
    ]
    if not items:
        parts.append(f'<desc id="{chart_id}-d">Nothing to show.</desc>')
        parts.append(
            f'<text class="chart-empty" x="{width / 2}" y="{height / 2 + 4}" '
            f'text-anchor="middle">Nothing to show</text></svg>'
        )
        return Markup("".join(parts))
    top_value = max(value for _, value in items)
    largest = max(items, key=lambda item: item[1])
    description = f"{len(items)} bars; the largest is {largest[0]} at {fmt(largest[1])}."
    parts.append(f'<desc id="{chart_id}-d">{escape(description)}</desc>')
    for index, (label, value) in enumerate(items):
        row_y = pad + index * row_h
        bar_w = 0.0 if top_value <= 0 else max(value / top_value * bar_max, 1.0)
        shown = label if len(label) <= 20 else label[:19] + "…"
        parts.append(
            f'<text class="chart-label" x="{label_w - 8}" y="{row_y + 18}" '
            f'text-anchor="end">{escape(shown)}</text>'
        )
        parts.append(
            f'<rect class="chart-bar-fill" x="{label_w}" y="{row_y + 5}" '
            f'width="{_num(bar_w)}" height="{row_h - 10}" rx="3"/>'
        )
        parts.append(
            f'<text class="chart-value" x="{_num(label_w + bar_w + 6)}" y="{row_y + 18}">'
            f"{escape(fmt(value))}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))
