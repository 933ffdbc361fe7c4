"""Alarms: one per object, persisted in a small index per namespace, fired by one task.

The index (``state_dir/objects/<ClassName>/_alarms.sqlite``) holds ``id``, ``name``,
``time`` (epoch ms) and ``retry`` for every pending alarm, so a restarted host finds due
alarms without opening object files. A row is removed only after ``alarm()`` returned,
so an alarm interrupted by a crash fires again after restart (at least once).

An alarm that raises is retried after 2, 4, 8, 16, 32 and 64 s, then dropped with an
error log. Setting a new alarm from inside ``alarm()`` replaces the running one.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ..observe.records import LogRecord, LogSink
from .files import private_dir, private_file

__all__ = ["AlarmInfo", "AlarmScheduler", "AlarmSlot", "retry_delay"]

log = logging.getLogger("dockyard.objects")

INDEX_FILE = "_alarms.sqlite"
RETRY_BASE_SECONDS = 2.0
MAX_RETRIES = 6


@dataclass(frozen=True, slots=True)
class AlarmInfo:
    """What ``alarm(info)`` is told: whether this run retries a failed one, and how often."""

    is_retry: bool
    retry_count: int


def retry_delay(retry: int, base: float = RETRY_BASE_SECONDS) -> float:
    """Seconds before retry number ``retry`` (1-based): 2, 4, 8, ..."""
    return base * 2 ** (retry - 1)


def now_ms() -> float:
    return time.time() * 1000


@dataclass(slots=True)
class _Alarm:
    class_name: str
    id_hex: str
    name: str | None
    time: float
    retry: int
    seq: int
    running: bool = False


class _Index:
    """One namespace's alarm index file, opened on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            private_dir(self.path.parent)
            private_file(self.path)
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS alarms (id TEXT PRIMARY KEY, name TEXT, "
                "time REAL NOT NULL, retry INTEGER NOT NULL DEFAULT 0)"
            )
            self._conn = conn
        return self._conn

    def load(self) -> list[tuple[str, str | None, float, int]]:
        return self.conn.execute("SELECT id, name, time, retry FROM alarms").fetchall()

    def put(self, alarm: _Alarm) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO alarms (id, name, time, retry) VALUES (?, ?, ?, ?)",
            (alarm.id_hex, alarm.name, alarm.time, alarm.retry),
        )

    def remove(self, id_hex: str) -> None:
        self.conn.execute("DELETE FROM alarms WHERE id = ?", (id_hex,))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


DeliverAlarm = Callable[[str, str, "str | None", AlarmInfo], Awaitable[None]]


class AlarmScheduler:
    """Keeps every pending alarm of a host in memory and fires each when due.

    ``retry_base`` and ``max_retries`` may be changed before alarms fail (tests shorten
    the backoff this way).
    """

    def __init__(
        self, objects_dir: Path, deliver: DeliverAlarm, is_bound: Callable[[str], bool]
    ) -> None:
        self._dir = objects_dir
        self._deliver = deliver
        self._is_bound = is_bound
        self._indexes: dict[str, _Index] = {}
        self._alarms: dict[tuple[str, str], _Alarm] = {}
        self._heap: list[tuple[float, int, tuple[str, str]]] = []
        self._parked: dict[str, list[tuple[str, str]]] = {}
        self._seq = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Where failed runs are recorded (platform events "alarm.retry"), and for which app.
        self.sink: LogSink | None = None
        self.app = ""
        self._firing: set[asyncio.Task[None]] = set()
        self.retry_base = RETRY_BASE_SECONDS
        self.max_retries = MAX_RETRIES

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        private_dir(self._dir)
        if self._dir.is_dir():
            for path in sorted(self._dir.glob(f"*/{INDEX_FILE}")):
                class_name = path.parent.name
                for id_hex, name, when, retry in self._index(class_name).load():
                    self._remember(_Alarm(class_name, id_hex, name, when, retry, 0))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dockyard-alarms")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._firing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        for index in self._indexes.values():
            index.close()
        self._indexes.clear()

    # -- the per-object API (through AlarmSlot) ------------------------------------------

    def get(self, class_name: str, id_hex: str) -> float | None:
        alarm = self._alarms.get((class_name, id_hex))
        if alarm is None or alarm.running:
            return None
        return alarm.time

    def set(self, class_name: str, id_hex: str, name: str | None, when: float) -> None:
        alarm = _Alarm(class_name, id_hex, name, when, 0, 0)
        self._index(class_name).put(alarm)
        self._remember(alarm)
        self._wake.set()

    def delete(self, class_name: str, id_hex: str) -> None:
        if self._alarms.pop((class_name, id_hex), None) is not None:
            self._index(class_name).remove(id_hex)

    def class_bound(self, class_name: str) -> None:
        """A class was (re)bound: its parked alarms become deliverable."""
        for key in self._parked.pop(class_name, []):
            alarm = self._alarms.get(key)
            if alarm is not None and not alarm.running:
                heapq.heappush(self._heap, (alarm.time, alarm.seq, key))
        self._wake.set()

    def pending(self) -> int:
        return len(self._alarms)

    # -- internals -------------------------------------------------------------------

    def _index(self, class_name: str) -> _Index:
        index = self._indexes.get(class_name)
        if index is None:
            index = self._indexes[class_name] = _Index(self._dir / class_name / INDEX_FILE)
        return index

    def _remember(self, alarm: _Alarm) -> None:
        self._seq += 1
        alarm.seq = self._seq
        key = (alarm.class_name, alarm.id_hex)
        self._alarms[key] = alarm
        heapq.heappush(self._heap, (alarm.time, alarm.seq, key))

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            delay = self._fire_due()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _fire_due(self) -> float | None:
        """Start every due alarm; return seconds until the next one (None: none pending)."""
        now = now_ms()
        loop = asyncio.get_running_loop()
        while self._heap:
            when, seq, key = self._heap[0]
            alarm = self._alarms.get(key)
            if alarm is None or alarm.seq != seq or alarm.running:
                heapq.heappop(self._heap)
                continue
            if not self._is_bound(alarm.class_name):
                heapq.heappop(self._heap)
                self._parked.setdefault(alarm.class_name, []).append(key)
                continue
            if when > now:
                return (when - now) / 1000
            heapq.heappop(self._heap)
            alarm.running = True
            task = loop.create_task(self._fire(alarm))
            self._firing.add(task)
            task.add_done_callback(self._firing.discard)
        return None

    def _record(self, alarm: _Alarm, attempt: int, error: BaseException, *, dropped: bool) -> None:
        """A platform event for the log store: the failed run, and whether it is retried."""
        if self.sink is None:
            return
        self.sink.emit(
            LogRecord(
                app=self.app,
                message=(
                    f"alarm of {alarm.class_name} {alarm.name or alarm.id_hex} failed "
                    f"{attempt} times, dropping it: {error!r}"
                    if dropped
                    else f"alarm of {alarm.class_name} {alarm.name or alarm.id_hex} failed "
                    f"(retry {attempt} follows): {error!r}"
                ),
                source="platform",
                stream="event",
                level="error" if dropped else "warning",
                class_name=alarm.class_name,
                object_id=alarm.id_hex,
                object_name=alarm.name or "",
                event="alarm.retry",
                fields={"attempt": attempt, "error": type(error).__name__, "dropped": dropped},
            )
        )

    async def _fire(self, alarm: _Alarm) -> None:
        info = AlarmInfo(is_retry=alarm.retry > 0, retry_count=alarm.retry)
        key = (alarm.class_name, alarm.id_hex)
        try:
            await self._deliver(alarm.class_name, alarm.id_hex, alarm.name, info)
            error: BaseException | None = None
        except Exception as exc:
            error = exc
        if self._alarms.get(key) is not alarm:
            return  # deleted or replaced while it ran
        alarm.running = False
        if error is None:
            self.delete(*key)
            return
        retry = alarm.retry + 1
        self._record(alarm, retry, error, dropped=retry > self.max_retries)
        if retry > self.max_retries:
            log.error(
                "alarm of %s %s failed %d times, dropping it: %r",
                alarm.class_name,
                alarm.name or alarm.id_hex,
                retry,
                error,
            )
            self.delete(*key)
            return
        log.warning(
            "alarm of %s %s failed (retry %d follows): %r",
            alarm.class_name,
            alarm.name or alarm.id_hex,
            retry,
            error,
        )
        alarm.retry = retry
        alarm.time = now_ms() + retry_delay(retry, self.retry_base) * 1000
        self._index(alarm.class_name).put(alarm)
        self._remember(alarm)
        self._wake.set()


class AlarmSlot:
    """The alarm of one object, as its storage sees it."""

    __slots__ = ("_class_name", "_id_hex", "_name", "_scheduler")

    def __init__(
        self, scheduler: AlarmScheduler, class_name: str, id_hex: str, name: str | None
    ) -> None:
        self._scheduler = scheduler
        self._class_name = class_name
        self._id_hex = id_hex
        self._name = name

    def get(self) -> float | None:
        return self._scheduler.get(self._class_name, self._id_hex)

    def set(self, when_ms: float) -> None:
        self._scheduler.set(self._class_name, self._id_hex, self._name, when_ms)

    def delete(self) -> None:
        self._scheduler.delete(self._class_name, self._id_hex)
