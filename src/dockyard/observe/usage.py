"""Usage metering: what each container run used, in 10 ms steps, and what it costs.

A *run* is one start of one container, keyed by (container id, the engine's StartedAt),
so a container started again is a new run. Everything billed comes from the engine:

- Time: StartedAt and FinishedAt from inspect (event times where the container is
  already gone). A meter that was down (node restart) asks the engine again, so the
  downtime is neither lost nor counted twice. A container removed while nobody metered
  it ends at its last reading: the one time known for sure.
- CPU and egress: the container's cumulative cgroup and network counters. The meter keeps
  the last value read; a new reading replaces it, never adds to it. What a container
  burns after the last reading before it exits is lost (its cgroup goes with it): the
  platform calls `read_now` before it stops a container, and the meter reads every
  `interval` seconds. Docker answers a stats call at its collector's next tick (up to
  a second later), so one tick reads all containers at once.
- Memory and disk: the provisioned size of the instance type (labels ``dockyard.vcpu``,
  ``dockyard.memory_mib``, ``dockyard.disk_mb``) times the seconds it ran.

Paused time is not billed for memory or disk: a paused container runs nothing and is a
platform choice (sleep by pause), so billing it would charge the user for our way of
sleeping. It is kept and reported as `UsageRow.paused_seconds`. Pause and unpause times
come from engine events (`on_event`); without them a reconciliation (every
`RECONCILE_EVERY` ticks) notices a pause with up to that much error.

`usage()` splits runs at UTC midnights and at the query's window, then meters each piece
(running seconds and CPU rounded up to 10 ms per piece). CPU and egress of a run that
crosses a cut are shared out in proportion to time. Monthly allowances (`Prices`) are
used up per node and UTC month in time order, whatever the query's filter. Keys of
``by="class"`` are class names: ask with ``app=`` where two apps share one.

Over 400 lines: one meter: sampling, the 10 ms step arithmetic, the prices and the store
of runs share the open-run state; the price and step helpers could move out, and are
only used here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from dockyard.containers import labels as L
from dockyard.containers.runtime import (
    ContainerEvent,
    ContainerInfo,
    ContainerLifecycle,
    ContainerObservation,
    ContainerStats,
)
from dockyard.errors import ContainerError
from dockyard.observe.records import UsageRow

__all__ = ["Prices", "UsageMeter"]

log = logging.getLogger("dockyard.observe.usage")

STEP_US = 10_000  # metering granularity: 10 ms
SAMPLE_KEEP_SECONDS = 3600.0
RECONCILE_EVERY = 12  # ticks between full listings of the engine's containers
_DAY_US = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    container_id TEXT NOT NULL, started_us INTEGER NOT NULL,
    app TEXT NOT NULL, class_name TEXT NOT NULL, object_id TEXT NOT NULL,
    object_name TEXT NOT NULL, vcpu REAL NOT NULL, memory_mib REAL NOT NULL,
    disk_mb REAL NOT NULL, ended_us INTEGER, paused_us INTEGER NOT NULL DEFAULT 0,
    paused_since_us INTEGER, cpu_ns INTEGER NOT NULL DEFAULT 0,
    tx_bytes INTEGER NOT NULL DEFAULT 0, read_us INTEGER,
    PRIMARY KEY (container_id, started_us));
CREATE INDEX IF NOT EXISTS runs_by_end ON runs (ended_us);
CREATE TABLE IF NOT EXISTS samples (
    container_id TEXT NOT NULL, started_us INTEGER NOT NULL, time REAL NOT NULL,
    cpu_fraction REAL NOT NULL, memory_bytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS samples_by_run ON samples (container_id, started_us, time);
"""


class _Runtime(ContainerObservation, ContainerLifecycle, Protocol):
    pass


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per unit; the ``included_*`` monthly allowances are off (0) by default."""

    memory_gib_second: float = 0.0000025
    vcpu_second: float = 0.000020
    disk_gb_second: float = 0.00000007
    egress_gb: float = 0.0
    included_memory_gib_seconds: float = 0.0
    included_vcpu_seconds: float = 0.0
    included_disk_gb_seconds: float = 0.0
    included_egress_gb: float = 0.0


def _us(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _steps(us: float) -> float:
    """Seconds, rounded up to whole 10 ms steps."""
    return math.ceil(round(us) / STEP_US) * STEP_US / 1e6


def _size(labels: Mapping[str, str], key: str) -> float:
    try:
        return max(0.0, float(labels.get(key) or 0))
    except ValueError:
        return 0.0


class UsageMeter:
    """Meters the runs of containers carrying all of `labels` into the SQLite file `path`."""

    def __init__(
        self,
        path: Path,
        runtime: _Runtime,
        labels: Mapping[str, str],
        *,
        prices: Prices = Prices(),
        interval: float = 5.0,
    ) -> None:
        self._path = Path(path)
        self._runtime = runtime
        self._labels = dict(labels)
        self._prices = prices
        self._interval = interval
        self._db: sqlite3.Connection | None = None
        self._open: dict[str, int] = {}  # container id -> started_us of its open run
        self._previous: dict[str, tuple[float, int]] = {}  # id -> (time, cpu_ns) last read
        self._latest: dict[str, tuple[float, float, int]] = {}  # id -> last sample
        self._events: asyncio.Queue[ContainerEvent] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def prices(self) -> Prices:
        """What costs are computed at."""
        return self._prices

    async def __aenter__(self) -> UsageMeter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self._path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        return self._db

    async def start(self) -> None:
        """Continue the runs the file left open and adopt what runs now."""
        self._open = dict(
            self._conn().execute("SELECT container_id, started_us FROM runs WHERE ended_us IS NULL")
        )
        async with self._lock:
            with self._logged("adopt running containers"):
                await self._reconcile()
        self._task = asyncio.create_task(self._main(), name="usage-meter")

    async def aclose(self) -> None:
        """Stop the loop, take a last reading of every open run, close the file."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._db is None:
            return
        async with self._lock:
            with self._logged("take a last reading"):
                await self._read(*self._open)
        db, self._db = self._db, None
        db.close()

    def on_event(self, event: ContainerEvent) -> None:
        """Takes an engine event (start, die, pause, unpause, destroy); never blocks."""
        if all(event.labels.get(key) == value for key, value in self._labels.items()):
            self._events.put_nowait(event)

    async def read_now(self, container_id: str) -> None:
        """Read the container's counters now (the platform calls it before a stop).
        Never raises for engine trouble: it logs, and the next tick reads again."""
        async with self._lock:
            with self._logged(f"read {container_id[:12]}"):
                if container_id not in self._open:
                    info = await self._runtime.inspect(container_id)
                    if info is not None:
                        self._adopt(info)
                if container_id in self._open:
                    await self._read(container_id)

    # The loop

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self._interval
        ticks = 0
        while True:
            wait = next_tick - loop.time()
            if wait > 0:
                try:
                    event = await asyncio.wait_for(self._events.get(), wait)
                except TimeoutError:
                    continue
                async with self._lock:
                    with self._logged(f"meter a {event.action} event"):
                        await self._handle(event)
                continue
            next_tick = loop.time() + self._interval
            ticks += 1
            async with self._lock:
                with self._logged("read container stats"):
                    if ticks % RECONCILE_EVERY == 0:
                        await self._reconcile()
                    await self._read(*self._open)
                    cutoff = time.time() - SAMPLE_KEEP_SECONDS
                    self._conn().execute("DELETE FROM samples WHERE time < ?", (cutoff,))

    @contextlib.contextmanager
    def _logged(self, action: str) -> Iterator[None]:
        # The engine may be away (it comes back, and the counters are cumulative): log
        # and go on; the next tick or reconciliation catches up. Anything else is a bug,
        # logged with its traceback, and must not end the metering of every container.
        try:
            yield
        except (ContainerError, sqlite3.Error) as exc:
            log.warning("usage meter could not %s: %s", action, exc)
        except Exception:
            log.exception("usage meter failed to %s", action)

    async def _handle(self, event: ContainerEvent) -> None:
        at = round(event.time * 1e6)
        cid = event.container_id
        if event.action == "start" or (
            event.action in ("pause", "unpause") and cid not in self._open
        ):
            info = await self._runtime.inspect(cid)
            if info is not None:
                self._adopt(info)
            elif event.action == "start":
                self._insert(cid, at, event.labels, ended_us=None)
        if event.action in ("die", "destroy") and cid in self._open:
            info = await self._runtime.inspect(cid)
            if info is not None and info.started_at is not None:
                self._adopt(info)
            else:
                self._close(cid, at)
        elif event.action == "pause" and cid in self._open:
            self._pause(cid, at)
        elif event.action == "unpause" and cid in self._open:
            self._unpause(cid, at)

    def _update(self, cid: str, assignments: str, *values: object) -> None:
        """``UPDATE runs SET <assignments>`` for the container's open run."""
        self._conn().execute(
            f"UPDATE runs SET {assignments} WHERE container_id = ? AND started_us = ?",
            (*values, cid, self._open[cid]),
        )

    def _pause(self, cid: str, at: int) -> None:
        self._update(cid, "paused_since_us = coalesce(paused_since_us, ?)", at)

    def _unpause(self, cid: str, at: int) -> None:
        self._update(
            cid,
            "paused_us = paused_us + coalesce(max(0, ? - paused_since_us), 0), "
            "paused_since_us = NULL",
            at,
        )

    async def _reconcile(self) -> None:
        infos = await self._runtime.list(self._labels)
        for info in infos:
            self._adopt(info)
        seen = {info.id for info in infos}
        for cid in [cid for cid in self._open if cid not in seen]:
            # Removed while nobody watched: it ran at least until its last reading.
            self._close(cid, self._last_seen(cid))

    def _last_seen(self, cid: str) -> int:
        query = "SELECT coalesce(read_us, started_us) FROM runs WHERE container_id = ? "
        row = self._conn().execute(query + "AND started_us = ?", (cid, self._open[cid]))
        return int(row.fetchone()[0])

    def _adopt(self, info: ContainerInfo) -> None:
        """Bring the file in line with what the engine says about this container."""
        if info.started_at is None:
            return
        started = _us(info.started_at)
        cid = info.id
        if self._open.get(cid, started) != started:
            # Started again since: the earlier run ended at its last reading at least.
            self._close(cid, self._last_seen(cid))
        finished = _us(info.finished_at) if info.finished_at is not None else None
        ended = (
            None if info.running else (finished if finished and finished >= started else started)
        )
        self._insert(cid, started, info.labels, ended_us=ended)
        if info.running:
            # Catches a pause or unpause whose event never came (the meter was down).
            now = round(time.time() * 1e6)
            (self._pause if info.status == "paused" else self._unpause)(cid, now)
        elif cid in self._open:
            self._close(cid, ended or started)

    def _insert(
        self, cid: str, started: int, labels: Mapping[str, str], *, ended_us: int | None
    ) -> None:
        self._conn().execute(
            "INSERT OR IGNORE INTO runs (container_id, started_us, app, class_name, "
            "object_id, object_name, vcpu, memory_mib, disk_mb, ended_us) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cid, started, labels.get(L.APP, ""), labels.get(L.CLASS, ""),
                labels.get(L.OBJECT, ""), labels.get(L.NAME, ""), _size(labels, L.VCPU),
                _size(labels, L.MEMORY_MIB), _size(labels, L.DISK_MB), ended_us,
            ),
        )  # fmt: skip
        if ended_us is None:
            self._open[cid] = started

    def _close(self, cid: str, ended: int) -> None:
        if cid in self._open:
            self._unpause(cid, ended)
            self._update(cid, "ended_us = max(started_us, ?)", ended)
            del self._open[cid]
        self._previous.pop(cid, None)
        self._latest.pop(cid, None)

    async def _read(self, *ids: str) -> None:
        """Read these open runs' counters together: the engine may take up to a second
        for each answer, however many are asked at once."""
        readings = await asyncio.gather(
            *(self._runtime.stats(cid) for cid in ids), return_exceptions=True
        )
        for cid, stats in zip(ids, readings, strict=True):
            if isinstance(stats, ContainerError):
                log.warning("usage meter could not read %s: %s", cid[:12], stats)
            elif isinstance(stats, BaseException):
                raise stats
            else:
                await self._apply(cid, stats)

    async def _apply(self, cid: str, stats: ContainerStats | None) -> None:
        started = self._open.get(cid)
        if started is None:
            return
        if stats is None:  # stopped or gone: inspect says when
            info = await self._runtime.inspect(cid)
            if info is not None and info.started_at is not None:
                self._adopt(info)
            else:  # removed: it ran at least until its last reading
                self._close(cid, self._last_seen(cid))
            return
        # Counters are cumulative: keep the newest, never add.
        assignments = "cpu_ns = max(cpu_ns, ?), tx_bytes = max(tx_bytes, ?), read_us = ?"
        self._update(cid, assignments, stats.cpu_ns, stats.tx_bytes, round(stats.time * 1e6))
        previous = self._previous.get(cid)
        self._previous[cid] = (stats.time, stats.cpu_ns)
        if previous is None or stats.time <= previous[0] or stats.cpu_ns < previous[1]:
            return
        fraction = (stats.cpu_ns - previous[1]) / 1e9 / (stats.time - previous[0])
        self._latest[cid] = (stats.time, fraction, stats.memory_bytes)
        self._conn().execute(
            "INSERT INTO samples VALUES (?, ?, ?, ?, ?)",
            (cid, started, stats.time, fraction, stats.memory_bytes),
        )

    # Queries

    def live(self) -> list[dict[str, Any]]:
        """Per running container: its labels, start (Unix seconds), latest CPU (vCPUs) and
        memory bytes."""
        names = ("container_id", "app", "class_name", "object_id", "object_name", "started_at")
        rows = self._conn().execute(
            f"SELECT {', '.join(names[:-1])}, started_us, paused_since_us IS NOT NULL "
            "FROM runs WHERE ended_us IS NULL"
        )
        result = []
        for *row, paused in rows:
            item: dict[str, Any] = dict(zip(names, row, strict=True))
            item["started_at"] = item["started_at"] / 1e6  # the engine's StartedAt
            latest = self._latest.get(row[0], (None, None, None))
            item.update(zip(("time", "cpu_fraction", "memory_bytes"), latest, strict=True))
            item["paused"] = bool(paused)
            result.append(item)
        return result

    def samples(self, container_id: str) -> list[tuple[float, float, int]]:
        """(time, cpu fraction, memory bytes) of the container's latest run, last hour."""
        return [
            (t, f, m)
            for t, f, m in self._conn().execute(
                "SELECT time, cpu_fraction, memory_bytes FROM samples WHERE container_id = ? "
                "AND started_us = (SELECT max(started_us) FROM runs WHERE container_id = ?) "
                "AND time >= ? ORDER BY time",
                (container_id, container_id, time.time() - SAMPLE_KEEP_SECONDS),
            )
        ]

    def usage(
        self,
        *,
        app: str | None = None,
        since: float | None = None,
        until: float | None = None,
        by: str = "app",
    ) -> list[UsageRow]:
        """Metered use in [since, until), grouped by app, class, object (id) or day."""
        if by not in ("app", "class", "object", "day"):
            raise ValueError(f"usage by {by!r}: use app, class, object or day")
        now = round(time.time() * 1e6)
        low = round(since * 1e6) if since is not None else 0
        high = min(round(until * 1e6), now) if until is not None else now
        # Allowances are used up from the start of the month, whatever the filter.
        month = datetime.fromtimestamp(low / 1e6, UTC).date().replace(day=1)
        rows = self._conn().execute(
            "SELECT * FROM runs WHERE coalesce(ended_us, ?) > ? AND started_us < ?",
            (now, _us(datetime(month.year, month.month, 1, tzinfo=UTC)), high),
        )
        pieces = []
        for row in rows:
            (cid, start, r_app, class_name, object_id, _name, _vcpu, mem, disk, ended,
             paused, paused_since, cpu_ns, tx, _read) = row  # fmt: skip
            end = ended if ended is not None else now
            paused += max(0, end - paused_since) if paused_since is not None else 0
            cuts = {start, end, low, high, *range((start // _DAY_US + 1) * _DAY_US, end, _DAY_US)}
            edges = sorted(cut for cut in cuts if start <= cut <= end)
            for a, b in itertools.pairwise(edges):
                share = (b - a) / max(end - start, 1)
                running = _steps(max(0, end - start - paused) * share)
                day = datetime.fromtimestamp(a / 1e6, UTC)
                keys = {"app": r_app, "class": class_name, "object": object_id}
                counted = low <= a < high and app in (None, r_app)
                amounts = (running * mem / 1024, _steps(cpu_ns / 1000 * share),
                           running * disk / 1000, tx * share / 1e9)  # fmt: skip
                group = keys.get(by, f"{day:%Y-%m-%d}") if counted else None
                pieces.append((a, f"{day:%Y-%m}", group, (cid, start), running,
                               _steps(paused * share), amounts))  # fmt: skip
        return self._rows(sorted(pieces, key=lambda piece: piece[0]))

    def _rows(self, pieces: list[Any]) -> list[UsageRow]:
        p = self._prices
        unit = (p.memory_gib_second, p.vcpu_second, p.disk_gb_second, p.egress_gb)
        included = (p.included_memory_gib_seconds, p.included_vcpu_seconds,
                    p.included_disk_gb_seconds, p.included_egress_gb)  # fmt: skip
        left: dict[str, list[float]] = {}
        runs: dict[str, set[tuple[str, int]]] = {}
        sums: dict[str, list[float]] = {}  # running, paused, 4 amounts, cost
        for _at, month, key, run, running, paused, amounts in pieces:
            remaining = left.setdefault(month, list(included))
            cost = 0.0
            for i, amount in enumerate(amounts):
                free = min(amount, remaining[i])
                remaining[i] -= free
                cost += (amount - free) * unit[i]
            if key is not None:
                runs.setdefault(key, set()).add(run)
                total = sums.setdefault(key, [0.0] * 7)
                for i, value in enumerate((running, paused, *amounts, cost)):
                    total[i] += value
        rows = []
        for key, (run_s, paused_s, memory, cpu, disk, egress, cost) in sorted(sums.items()):
            seconds = (round(run_s, 2), round(paused_s, 2), round(cpu, 2))
            rows.append(
                UsageRow(key, len(runs[key]), *seconds, memory, disk, round(egress * 1e9), cost)
            )
        return rows
