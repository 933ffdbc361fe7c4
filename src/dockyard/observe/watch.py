"""The node's engine watcher: every line its containers print, and every engine event.

`EngineWatcher` follows each running container that carries its labels, and each one the
engine starts later (from the event stream), and turns their lines into
``LogRecord(source="container")`` for a `LogSink`. Every `ContainerEvent` also goes to
`on_event` (the usage meter and the metrics use it).

Nothing is lost or repeated across a watcher restart: the cursor file keeps, per
container, the time of the newest line delivered and how many lines with exactly that
time were delivered (a line the engine cut in pieces, or lines of one instant, share a
time). A restart reads from that time and skips what it already delivered. Two limits,
both the engine's: stdout and stderr are stamped by two copiers, so a line of one
stream can be stored after a slightly later line of the other; one that falls exactly at
a restart's cut is skipped. And the cursor is saved every `save_interval` seconds and on
`aclose`, so a watcher killed outright repeats at most that much on its next start.

An engine that cannot be reached (`EngineUnavailable`) is retried with back-off, from the
listing on: lines printed meanwhile are read from the cursor once it is back.

Beside a local engine (`LogFiles`), lines are read from the engine's own log file instead
of its follow API (observe/logfile.py), as `LogBatch` es: far cheaper for the engine and
for the node, exact across restarts (the store keeps each file's position with its
lines, `positions`), and unaffected by engine outages. The cursor above then serves only
containers whose file cannot be read.

Over 400 lines: one watcher: per-container cursors, the log follow and the event stream
share the set of followed containers and their cursors, which must stay consistent
across engine outages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from dockyard._closing import AsyncClosing
from dockyard.containers import labels as label_names
from dockyard.containers.runtime import (
    ContainerEvent,
    ContainerInfo,
    ContainerLifecycle,
    ContainerObservation,
    LogFiles,
)
from dockyard.errors import ContainerError, ContainerGone, EngineUnavailable
from dockyard.observe.logfile import JsonLogFile, LineRun
from dockyard.observe.records import (
    FilePosition,
    LogBatch,
    LogRecord,
    LogSink,
    Stream,
    emit_batch,
)

__all__ = ["EngineWatcher", "WatchedRuntime"]

log = logging.getLogger("dockyard.observe.watch")
_STREAMS: dict[str, Stream] = {"stdout": "stdout", "stderr": "stderr"}
# How many of a stream's latest lines a repeat is looked for among (see _deliver).
_RECENT = 4096
# A log file is looked at again this soon after it gave lines, backing off to the most.
_POLL_SOON, _POLL_MOST = 0.02, 0.25
# After a container stops, its file is read for this long more (the engine may still be
# copying its last lines) before its reader ends.
_DRAIN = 1.0


class WatchedRuntime(ContainerObservation, ContainerLifecycle, Protocol):
    """What the watcher needs of a runtime: observation plus list and inspect."""


class _Cursor:
    """Per container ``[time of the newest line delivered, lines delivered at that
    time]``, and when it was last saved (the watcher was alive until then)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.marks: dict[str, list[float]] = {}
        self.saved_at: float | None = None  # None: no earlier watcher left a cursor
        self._saved: dict[str, tuple[float, float]] = {}

    def load(self) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text())
            saved_at = float(data.get("saved_at") or 0.0)
            marks = {
                str(key): [float(at), float(count)]
                for key, (at, count) in (data.get("containers") or {}).items()
            }
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # Reading everything again beats refusing to start: say so and go on.
            log.warning("Ignoring the unreadable log cursor %s: %s", self.path, exc)
            return
        self.saved_at, self.marks = saved_at, marks
        self._saved = self._snapshot()

    def _snapshot(self) -> dict[str, tuple[float, float]]:
        return {key: (mark[0], mark[1]) for key, mark in self.marks.items()}

    async def save(self, *, force: bool = False) -> None:
        """Write the cursor if it changed (or once a minute: `saved_at` says until when
        a watcher was alive); `force` writes it in any case (the watcher is closing)."""
        if self.path is None:
            return
        snapshot = self._snapshot()
        now = time.time()
        recent = self.saved_at is not None and now - self.saved_at < 60
        if snapshot == self._saved and recent and not force:
            return
        await asyncio.to_thread(self._write, snapshot, now)
        self._saved, self.saved_at = snapshot, now

    def _write(self, snapshot: dict[str, tuple[float, float]], now: float) -> None:
        assert self.path is not None
        data = {"saved_at": now, "containers": snapshot}
        scratch = self.path.with_name(self.path.name + ".tmp")
        with open(scratch, "w") as file:
            json.dump(data, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, self.path)


class EngineWatcher(AsyncClosing):
    """Follows the engine for containers carrying all of `labels` (OBSERVE.md, part 2).

    ``async with EngineWatcher(...)`` or `start()` / `aclose()`; `start()` returns once
    the running containers are followed (or the engine was found unavailable: it keeps
    retrying in the background).
    """

    def __init__(
        self,
        runtime: WatchedRuntime,
        labels: Mapping[str, str],
        sink: LogSink,
        *,
        on_event: Callable[[ContainerEvent], None] | None = None,
        cursor: Path | None = None,
        delivered: Callable[[float], Mapping[str, tuple[float, int]]] | None = None,
        positions: Callable[[], Mapping[str, FilePosition]] | None = None,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        save_interval: float = 1.0,
    ) -> None:
        self._runtime = runtime
        self._labels = dict(labels)
        self._sink = sink
        self._on_event = on_event
        self._cursor = _Cursor(Path(cursor) if cursor is not None else None)
        # What the sink already holds, per container (LogStore.newest_lines): read at
        # start, it makes a crash neither lose nor repeat a line the sink kept.
        self._delivered = delivered
        # Where each container's log file was stored up to (LogStore.file_positions).
        self._load_positions = positions
        self._positions: dict[str, FilePosition] = {}
        # Containers known to have stopped, and since when (monotonic): their file
        # readers end once they have read it out.
        self._stopped: dict[str, float] = {}
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._save_interval = save_interval
        self._tasks: set[asyncio.Task[None]] = set()
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._ready = asyncio.Event()
        # Where a new subscription to the event stream resumes, and the events already
        # passed on at exactly that time (the engine's `since` includes them again).
        self._events_since: float | None = None
        self._events_seen: set[tuple[str, str]] = set()
        # Since when the engine went unwatched (the last watcher's last save, or an
        # outage): a container that ran and stopped meanwhile is read at the next listing.
        self._unwatched_since: float | None = None
        self._started = False

    async def __aenter__(self) -> EngineWatcher:
        await self.start()
        return self

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await asyncio.to_thread(self._cursor.load)
        if self._load_positions is not None:
            self._positions = dict(await asyncio.to_thread(self._load_positions))
        self._unwatched_since = self._cursor.saved_at
        if self._delivered is not None and self._cursor.saved_at is not None:
            # The sink knows better than a cursor saved up to a second ago: resume each
            # container that printed since (with a margin) from what the sink kept.
            since = self._cursor.saved_at - 60.0
            kept = await asyncio.to_thread(self._delivered, since)
            for container_id, mark in self._cursor.marks.items():
                if container_id not in kept and mark[0] > since:
                    # The cursor was saved, the sink never kept those lines (a node killed
                    # in between): read them again from there.
                    mark[:] = [since, 0.0]
            for container_id, (at, count) in kept.items():
                self._cursor.marks[container_id] = [at, float(count)]
        self._own(self._watch_engine())
        if self._cursor.path is not None:
            self._own(self._save_periodically())
        await self._ready.wait()

    async def aclose(self) -> None:
        tasks = [*self._tasks, *self._followers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._followers.clear()
        if self._started:
            await self._cursor.save(force=True)

    def _own(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._save_interval)
            try:
                await self._cursor.save()
            except OSError as exc:
                log.warning("Could not save the log cursor %s: %s", self._cursor.path, exc)

    # Engine events and the listing

    async def _watch_engine(self) -> None:
        delay = self._retry_initial

        def listed() -> None:
            nonlocal delay
            delay = self._retry_initial  # the engine answered: back-off starts over
            self._ready.set()

        while True:
            try:
                await self._follow_engine(on_listed=listed)
            except ContainerError as exc:
                level = logging.INFO if isinstance(exc, EngineUnavailable) else logging.WARNING
                log.log(level, "Engine watch interrupted, retrying in %.1f s: %s", delay, exc)
            except Exception:
                log.exception("Engine watch failed, retrying in %.1f s", delay)
            if self._unwatched_since is None and self._ready.is_set():
                self._unwatched_since = time.time()
            self._ready.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)

    async def _follow_engine(self, *, on_listed: Callable[[], None]) -> None:
        # Subscribe from a time before the listing: a container that starts in between
        # is both listed and announced, and following is idempotent.
        since = self._events_since if self._events_since is not None else time.time()
        infos = await self._runtime.list(self._labels)
        self._follow_listed(infos)
        on_listed()
        self._events_since = since
        events = self._runtime.events(self._labels, since=since)
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                self._handle_event(event)

    def _follow_listed(self, infos: list[ContainerInfo]) -> None:
        present = {info.id for info in infos}
        for container_id in list(self._cursor.marks):
            if container_id not in present:
                del self._cursor.marks[container_id]
        unwatched_since, self._unwatched_since = self._unwatched_since, None
        for info in infos:
            # A stopped container is read (to its end) when it may hold lines not yet
            # delivered: it is in the cursor, or it ran while nothing watched.
            stopped_since = (
                info.finished_at is not None
                and unwatched_since is not None
                and info.finished_at.timestamp() >= unwatched_since
            )
            if info.running:
                self._stopped.pop(info.id, None)
            else:
                self._stopped.setdefault(info.id, time.monotonic())
            followed = info.id in self._cursor.marks or info.id in self._positions
            if info.running or followed or stopped_since:
                self._follow(info.id, info.labels)

    def _handle_event(self, event: ContainerEvent) -> None:
        key = (event.container_id, event.action)
        if self._events_since is not None and event.time <= self._events_since:
            if event.time < self._events_since or key in self._events_seen:
                return
        if self._events_since is None or event.time > self._events_since:
            self._events_since = event.time
            self._events_seen.clear()
        self._events_seen.add(key)
        if event.action == "start":
            self._stopped.pop(event.container_id, None)
            self._follow(event.container_id, event.labels)
        elif event.action == "die":
            self._stopped.setdefault(event.container_id, time.monotonic())
        elif event.action == "destroy":
            self._cursor.marks.pop(event.container_id, None)
            self._positions.pop(event.container_id, None)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("on_event failed for %s", event)

    # One container's lines

    def _follow(self, container_id: str, labels: Mapping[str, str]) -> None:
        current = self._followers.get(container_id)
        if current is not None and not current.done():
            return
        task = asyncio.create_task(self._follow_container(container_id, labels))
        self._followers[container_id] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._followers.get(container_id) is done:
                del self._followers[container_id]

        task.add_done_callback(forget)

    async def _follow_container(self, container_id: str, labels: Mapping[str, str]) -> None:
        delay = self._retry_initial
        while isinstance(self._runtime, LogFiles):
            try:
                path = await self._runtime.log_file(container_id)
            except ContainerGone:
                return
            except ContainerError as exc:
                log.info("Log file of %s not found yet: %s", container_id[:12], exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            if path is not None:
                await self._read_file(container_id, labels, path)
                return
            break
        delay = self._retry_initial
        mark = self._cursor.marks.setdefault(container_id, [0.0, 0.0])
        while True:
            try:
                delivered = await self._deliver(container_id, labels, mark)
                # The stream ends when the container stops; it may have been started
                # again meanwhile (its "start" found this follower still running).
                info = await self._runtime.inspect(container_id)
                if info is None or not info.running:
                    return
                if delivered:
                    delay = self._retry_initial
                    continue
            except ContainerGone:
                return
            except ContainerError as exc:
                level = logging.INFO if isinstance(exc, EngineUnavailable) else logging.WARNING
                log.log(level, "Log stream of %s interrupted: %s", container_id[:12], exc)
            except Exception:
                log.exception("Log stream of %s failed", container_id[:12])
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)

    async def _read_file(self, container_id: str, labels: Mapping[str, str], path: str) -> None:
        """Read the container's log file from where the store has it until the container
        has stopped and the file is read out (or removed)."""
        shared = _fields(labels, container_id)
        resume = self._positions.get(container_id)
        mark = self._cursor.marks.setdefault(container_id, [0.0, 0.0])
        # A container followed through the engine's API before (the cursor has its time,
        # the store no position): lines up to that time were delivered already.
        skip_until = mark[0] if resume is None else 0.0
        file = JsonLogFile(path, resume)
        wait = _POLL_SOON
        try:
            while True:
                runs = file.read()
                if runs:
                    if skip_until:
                        runs = [_after(run, skip_until) for run in runs]
                    self._emit_runs(container_id, shared, file.inode, runs, mark)
                    wait = _POLL_SOON
                    await asyncio.sleep(0)  # the loop's other work between reads
                    continue
                if file.gone:
                    return
                stopped = self._stopped.get(container_id)
                if stopped is not None and time.monotonic() - stopped > _DRAIN:
                    return
                await asyncio.sleep(wait)
                wait = min(wait * 2, _POLL_MOST)
        finally:
            file.close()

    def _emit_runs(
        self,
        container_id: str,
        shared: Mapping[str, Any],
        inode: int,
        runs: list[LineRun],
        mark: list[float],
    ) -> None:
        """One batch per run of a stream's lines, each with the position after its last."""
        for run in runs:
            position = FilePosition(container_id, inode, run.end)
            stream = _STREAMS.get(run.stream, "stdout")
            batch = LogBatch(
                stream=stream, times=run.times, texts=run.texts, position=position, **shared
            )
            emit_batch(self._sink, batch)
            self._positions[container_id] = position
            if run.times and run.times[-1] > mark[0]:
                mark[0], mark[1] = run.times[-1], 1.0

    async def _deliver(
        self, container_id: str, labels: Mapping[str, str], mark: list[float]
    ) -> int:
        """Read the container's lines after `mark`, emit them, and keep `mark` on the
        newest one delivered. Returns how many were delivered."""
        base: dict[str, Any] = {
            "source": "container",
            "level": "info",
            **_fields(labels, container_id),
        }
        emit = self._sink.emit
        streams = _STREAMS
        newest, at_newest = mark
        # Ask from a second early: the engine's `since` and ours may round differently.
        since = newest - 1.0 if newest else None
        seen_at_newest = 0  # lines at `newest` in this stream
        delivered = 0
        # The engine's follow sometimes sends a line again, with its own timestamp, a few
        # lines later (measured: 1 or 2 in 200,000 at 20,000 lines/s, the last line of a
        # burst; Docker 20.10, json-file). No two lines of one stream share a nanosecond,
        # so a line seen recently with the same time and text is that repeat.
        recent: set[tuple[float, str]] = set()
        order: collections.deque[tuple[float, str]] = collections.deque()
        lines = self._runtime.log_lines(container_id, follow=True, since=since)
        async with contextlib.aclosing(lines):  # type: ignore[type-var]
            async for line in lines:
                at = line.time
                key = (at, line.text)
                if key in recent:
                    continue
                recent.add(key)
                order.append(key)
                if len(order) > _RECENT:
                    recent.discard(order.popleft())
                if at > newest:
                    newest, at_newest, seen_at_newest = at, 1, 1
                elif at == newest:
                    seen_at_newest += 1
                    if seen_at_newest <= at_newest:
                        continue
                    at_newest = seen_at_newest
                else:
                    continue
                stream = streams.get(line.stream, "stdout")
                emit(LogRecord(message=line.text, stream=stream, time=at, **base))
                mark[0], mark[1] = newest, at_newest
                delivered += 1
        return delivered


def _fields(labels: Mapping[str, str], container_id: str) -> dict[str, Any]:
    """What every line of a container shares, from its labels."""
    # The deploy's number (nodes); VERSION is the image's hash, never a number to show.
    version = labels.get(label_names.DEPLOY, "")
    return {
        "app": labels.get(label_names.APP, ""),
        "version": int(version) if version.isdigit() else None,
        "class_name": labels.get(label_names.CLASS, ""),
        "object_id": labels.get(label_names.OBJECT, ""),
        "object_name": labels.get(label_names.NAME, ""),
        "container_id": container_id,
    }


def _after(run: LineRun, since: float) -> LineRun:
    """The run's lines after `since` (its position stays: what is left out is delivered)."""
    kept = [(at, text) for at, text in zip(run.times, run.texts, strict=True) if at > since]
    return LineRun(run.stream, [at for at, _ in kept], [text for _, text in kept], run.end)
