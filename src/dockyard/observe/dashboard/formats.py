"""How numbers and times read on the pages (registered as Jinja filters)."""

from __future__ import annotations

import time

__all__ = ["FILTERS", "duration", "mib", "percent", "short_id", "usd", "utc"]


def utc(t: float | None, *, with_date: bool = True) -> str:
    if t is None:
        return "—"
    pattern = "%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S"
    return time.strftime(pattern, time.gmtime(t))


def clock(t: float | None) -> str:
    """Time of day with milliseconds, for log lines."""
    if t is None:
        return "—"
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}"


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "—"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def percent(fraction: float | None, digits: int = 1) -> str:
    if fraction is None:
        return "—"
    return f"{fraction * 100:.{digits}f} %"


def mib(n: float | None) -> str:
    if n is None:
        return "—"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


def usd(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "$0.00"
    if abs(value) < 1:
        return f"${value:.6f}"
    return f"${value:,.2f}"


def number(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def short_id(container_id: str) -> str:
    return container_id[:12]


FILTERS = {
    "utc": utc,
    "clock": clock,
    "duration": duration,
    "percent": percent,
    "mib": mib,
    "usd": usd,
    "number": number,
    "short_id": short_id,
}
