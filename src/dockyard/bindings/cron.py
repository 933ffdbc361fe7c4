"""Cron triggers (``triggers.crons``): Cloudflare's cron syntax and a runner for ``dev``.

Five fields, UTC: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or
JAN-DEC), day of week (1-7 with 1 = Sunday, or SUN-SAT). Each field takes ``*``, a
value, a range ``a-b``, a step ``*/n``, ``a/n`` or ``a-b/n``, and lists of these
separated by commas; ``?`` means ``*`` in the two day fields. Quartz's extensions, as
Cloudflare documents them: ``L`` (last day of the month), ``LW`` and ``15W`` (the weekday
nearest to that day) in the day of month; ``5L`` (the month's last Thursday) and ``2#1``
(its first Monday) in the day of week. When both day fields are restricted, a day that
matches either fires (as classic cron does).

The runner fires each expression within a second of its minute. A run missed while
nothing was running (dev stopped, machine asleep) is not replayed: the next run is the
next future match.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CronError", "CronSchedule", "CronTriggers", "ScheduledController", "parse_cron"]

log = logging.getLogger("dockyard.cron")

_MONTHS = {name.upper(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"SUN": 1, "MON": 2, "TUE": 3, "WED": 4, "THU": 5, "FRI": 6, "SAT": 7}
# How far ahead a schedule is searched before it is declared never to fire.
_HORIZON_DAYS = 366 * 8


class CronError(ValueError):
    """A cron expression Dockyard (and Cloudflare) cannot read."""


@dataclass(frozen=True)
class _DaySpec:
    any: bool = True
    values: frozenset[int] = frozenset()
    last: bool = False  # L (day of month)
    last_weekday: bool = False  # LW
    nearest_weekday: frozenset[int] = frozenset()  # 15W
    last_of: frozenset[int] = frozenset()  # 5L (day of week: last such weekday)
    nth: frozenset[tuple[int, int]] = frozenset()  # 2#1 (weekday, n)


def _number(text: str, names: dict[str, int], low: int, high: int, what: str) -> int:
    upper = text.upper()
    if upper in names:
        return names[upper]
    if not text.isdigit():
        raise CronError(f"{what}: {text!r} is not a number from {low} to {high}")
    value = int(text)
    if not low <= value <= high:
        raise CronError(f"{what}: {value} is out of range {low}-{high}")
    return value


def _values(
    part: str, low: int, high: int, what: str, names: dict[str, int] | None = None
) -> set[int]:
    names = names or {}
    out: set[int] = set()
    for item in part.split(","):
        if not item:
            raise CronError(f"{what}: empty item in {part!r}")
        base, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{what}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base in ("*", "?"):
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start = _number(first, names, low, high, what)
            end = _number(last, names, low, high, what)
            if end < start:
                raise CronError(f"{what}: range {base!r} runs backwards")
        else:
            start = _number(base, names, low, high, what)
            end = high if step_text else start
        out.update(range(start, end + 1, step))
    return out


def _day_of_month(part: str) -> _DaySpec:
    if part in ("*", "?"):
        return _DaySpec()
    values: set[int] = set()
    nearest: set[int] = set()
    last = last_weekday = False
    plain: list[str] = []
    for item in part.split(","):
        upper = item.upper()
        if upper == "L":
            last = True
        elif upper == "LW":
            last_weekday = True
        elif upper.endswith("W") and upper[:-1].isdigit():
            nearest.add(_number(upper[:-1], {}, 1, 31, "day of month"))
        else:
            plain.append(item)
    if plain:
        values = _values(",".join(plain), 1, 31, "day of month")
    return _DaySpec(False, frozenset(values), last, last_weekday, frozenset(nearest))


def _day_of_week(part: str) -> _DaySpec:
    if part in ("*", "?"):
        return _DaySpec()
    plain: list[str] = []
    last_of: set[int] = set()
    nth: set[tuple[int, int]] = set()
    for item in part.split(","):
        upper = item.upper()
        if "#" in upper:
            day, _, n = upper.partition("#")
            if not n.isdigit() or not 1 <= int(n) <= 5:
                raise CronError(f"day of week: {item!r}: the number after # must be 1-5")
            nth.add((_number(day, _DAYS, 1, 7, "day of week"), int(n)))
        elif upper == "L":
            plain.append("7")  # Quartz: L alone is the last day of the week, Saturday
        elif upper.endswith("L"):
            last_of.add(_number(upper[:-1], _DAYS, 1, 7, "day of week"))
        else:
            plain.append(item)
    values = _values(",".join(plain), 1, 7, "day of week", _DAYS) if plain else set()
    return _DaySpec(False, frozenset(values), last_of=frozenset(last_of), nth=frozenset(nth))


def _weekday(date: dt.date) -> int:
    """Cloudflare's day-of-week number: 1 = Sunday ... 7 = Saturday."""
    return (date.weekday() + 1) % 7 + 1


def _nearest_weekday(year: int, month: int, day: int) -> int:
    last = calendar.monthrange(year, month)[1]
    day = min(day, last)
    weekday = dt.date(year, month, day).weekday()  # Monday = 0
    if weekday == 5:  # Saturday: the Friday before, unless that leaves the month
        return day - 1 if day > 1 else day + 2
    if weekday == 6:  # Sunday: the Monday after, unless that leaves the month
        return day + 1 if day < last else day - 2
    return day


@dataclass(frozen=True)
class CronSchedule:
    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    months: frozenset[int]
    dom: _DaySpec
    dow: _DaySpec = field(default_factory=_DaySpec)

    def _dom_matches(self, date: dt.date) -> bool:
        spec = self.dom
        last = calendar.monthrange(date.year, date.month)[1]
        if date.day in spec.values or (spec.last and date.day == last):
            return True
        if spec.last_weekday and date.day == _nearest_weekday(date.year, date.month, last):
            return True
        return any(
            date.day == _nearest_weekday(date.year, date.month, d) for d in spec.nearest_weekday
        )

    def _dow_matches(self, date: dt.date) -> bool:
        spec = self.dow
        weekday = _weekday(date)
        if weekday in spec.values:
            return True
        last = calendar.monthrange(date.year, date.month)[1]
        if weekday in spec.last_of and date.day + 7 > last:
            return True
        return (weekday, (date.day - 1) // 7 + 1) in spec.nth

    def matches_day(self, date: dt.date) -> bool:
        if date.month not in self.months:
            return False
        if self.dom.any and self.dow.any:
            return True
        if self.dom.any:
            return self._dow_matches(date)
        if self.dow.any:
            return self._dom_matches(date)
        return self._dom_matches(date) or self._dow_matches(date)

    def next_after(self, after: dt.datetime) -> dt.datetime | None:
        """The first matching minute strictly after ``after`` (a UTC datetime)."""
        start = after.astimezone(dt.UTC).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        date = start.date()
        for offset in range(_HORIZON_DAYS):
            day = date + dt.timedelta(days=offset)
            if not self.matches_day(day):
                continue
            for hour in self.hours:
                if offset == 0 and hour < start.hour:
                    continue
                for minute in self.minutes:
                    if offset == 0 and hour == start.hour and minute < start.minute:
                        continue
                    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC)
        return None


def parse_cron(expression: str) -> CronSchedule:
    """Parse a Cloudflare cron expression; CronError says what is wrong."""
    fields = expression.split()
    if len(fields) != 5:
        raise CronError(
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    minute, hour, dom, month, dow = fields
    schedule = CronSchedule(
        expression,
        tuple(sorted(_values(minute, 0, 59, "minute"))),
        tuple(sorted(_values(hour, 0, 23, "hour"))),
        frozenset(_values(month, 1, 12, "month", _MONTHS)),
        _day_of_month(dom),
        _day_of_week(dow),
    )
    if schedule.next_after(dt.datetime(2000, 1, 1, tzinfo=dt.UTC)) is None:
        raise CronError("it never fires (no such date)")
    return schedule


class ScheduledController:
    """What ``scheduled(controller, env, ctx)`` receives, with Cloudflare's names."""

    def __init__(self, cron: str, scheduled_time: float) -> None:
        self.cron = cron
        self.scheduled_time = scheduled_time  # epoch milliseconds
        self.type = "scheduled"

    @property
    def scheduledTime(self) -> float:  # Cloudflare's spelling
        return self.scheduled_time

    def no_retry(self) -> None:
        """Accepted: Dockyard never retries a failed scheduled run."""

    noRetry = no_retry

    def __repr__(self) -> str:
        return f"<ScheduledController {self.cron!r} at {self.scheduled_time:.0f}>"


Runner = Callable[[ScheduledController], Awaitable[Any]]


class CronTriggers:
    """Runs ``run(controller)`` at every match of each expression, from ``start()`` on."""

    def __init__(self, expressions: list[str], run: Runner) -> None:
        self.schedules = [parse_cron(e) for e in expressions]
        self._run = run
        self._loop_task: asyncio.Task[None] | None = None
        self._runs: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self.schedules and self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        runs = list(self._runs)
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    async def __aenter__(self) -> CronTriggers:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _loop(self) -> None:
        now = dt.datetime.now(dt.UTC)
        due = [s.next_after(now) for s in self.schedules]
        while True:
            pending = [t for t in due if t is not None]
            if not pending:
                return
            target = min(pending)
            delay = target.timestamp() - time.time()
            if delay > 0:
                # A timer on the wall clock, re-checked at least each minute so a clock
                # step or a suspended machine is noticed.
                await asyncio.sleep(min(delay, 60.0))
                continue
            fired_at = dt.datetime.now(dt.UTC)
            for schedule, when in zip(self.schedules, due, strict=True):
                if when == target:
                    self._fire(schedule, when)
            # Missed matches are skipped: the next run is the next match after now.
            after = max(fired_at, target)
            due = [
                s.next_after(after) if when is not None and when <= target else when
                for s, when in zip(self.schedules, due, strict=True)
            ]

    def _fire(self, schedule: CronSchedule, when: dt.datetime) -> None:
        controller = ScheduledController(schedule.expression, when.timestamp() * 1000)
        task = asyncio.get_running_loop().create_task(self._invoke(controller))
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    async def _invoke(self, controller: ScheduledController) -> None:
        try:
            await self._run(controller)
        except Exception:
            log.exception("scheduled handler failed for cron %r", controller.cron)
