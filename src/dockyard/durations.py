"""Durations as wrangler and Cloudflare's Container class spell them: seconds or "10m"."""

from __future__ import annotations

import json
import math
import re

from dockyard.errors import ConfigError

__all__ = ["parse_duration", "parse_span"]

_DURATION = re.compile(r"(\d+)([smh])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
_EXPECTED = 'expected seconds as a number or a string like "10m" (digits then s, m or h)'


def parse_duration(value: int | float | str, *, where: str = "") -> float:
    """Return `value` in seconds: a number is seconds (>= 0), a string is `<digits><s|m|h>`."""
    # bool is an int subclass, but `sleep_after = true` is a mistake, not one second.
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value) and value >= 0:
            return float(value)
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match:
            return float(int(match[1]) * _UNIT_SECONDS[match[2]])
    raise ConfigError(f"{_EXPECTED}, got {_show(value)}", path=where or None)


_SPAN = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_SPAN_SECONDS = {**_UNIT_SECONDS, "d": 86400, "": 1}


def parse_span(value: str, *, where: str = "") -> float:
    """A span of time on the command line or in a query (log retention, ``--since 7d``):
    like `parse_duration`, plus days and decimals (``1.5h``)."""
    match = _SPAN.fullmatch(value.strip())
    if match:
        return float(match[1]) * _SPAN_SECONDS[match[2]]
    raise ConfigError(
        f'expected a span of time like "90s", "15m", "2h" or "7d", got {_show(value)}',
        path=where or None,
    )


def _show(value: object) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
