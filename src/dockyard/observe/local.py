"""What ``dockyard dev`` observes: the same log store, meter and engine watcher as a node,
kept in the project's state folder, and a console that shows every container line
prefixed by its class and object (``[Counter/room-1] listening on 8080``).

Platform events (containers started with their cold-start time, stopped with exit code
and reason, failed starts) are printed too; worker output needs no capture in dev (the
worker runs in the dev process and prints to the same terminal).
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TextIO

from ..containers import labels
from ..containers.runtime import ContainerObservation
from ..errors import DockyardError
from .dashboard.source import (
    AppDetail,
    AppSummary,
    InstanceDetail,
    InstanceRow,
)
from .instances import InstanceViews, class_summaries
from .logstore import LogStore
from .metrics import RequestRates
from .records import LogBatch, LogQuery, LogRecord, LogSink, UsageRow, emit_batch
from .usage import UsageMeter
from .watch import EngineWatcher

__all__ = ["ConsoleSink", "LocalDashboardSource", "LocalObservation", "Tee"]

_STYLES = {"error": "\x1b[31m", "warning": "\x1b[33m"}
_RESET = "\x1b[0m"
_CLASS_STYLE = "\x1b[36m"


class ConsoleSink:
    """Container lines and platform events on a terminal, one line each, prefixed by
    class and object (its name when it has one, else the first 8 characters of its id)."""

    def __init__(self, stream: TextIO | None = None, *, color: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.color = self.stream.isatty() if color is None else color

    def emit(self, record: LogRecord) -> None:
        if record.source == "worker":
            return  # the worker prints to this terminal itself
        who = record.object_name or record.object_id[:8]
        prefix = f"[{record.class_name}/{who}]" if record.class_name else f"[{record.app}]"
        text = record.message.replace("\x1b", "\\x1b").replace("\r", "\\r")
        if record.source == "platform":
            text = f"{record.event}: {text}"
        try:
            if self.color:
                style = _STYLES.get(record.level, "")
                self.stream.write(f"{_CLASS_STYLE}{prefix}{_RESET} {style}{text}{_RESET}\n")
            else:
                self.stream.write(f"{prefix} {text}\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal is no reason to stop serving


class Tee:
    """One sink that hands every record to several."""

    def __init__(self, *sinks: LogSink) -> None:
        self.sinks = sinks

    def emit(self, record: LogRecord) -> None:
        for sink in self.sinks:
            sink.emit(record)

    def emit_batch(self, batch: LogBatch) -> None:
        for sink in self.sinks:
            emit_batch(sink, batch)


class LocalObservation:
    """The dev process's store (``<state>/logs.db``), meter (``<state>/usage.db``) and
    watcher of the containers it owns. ``sink`` is where the app's platform events go."""

    def __init__(
        self,
        state_dir: Path,
        runtime: Any,
        owner: str,
        *,
        console: LogSink | None = None,
        usage_interval: float = 5.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.runtime = runtime
        self.owner = owner
        self.logs = LogStore(self.state_dir / "logs.db")
        self.console = console or ConsoleSink()
        self.sink: LogSink = Tee(self.logs, self.console)
        self.usage: UsageMeter | None = None
        self._watcher: EngineWatcher | None = None
        self._usage_interval = usage_interval
        self._closers: list[Callable[[], Any]] = []

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self.logs.start()
        self._closers.append(self.logs.aclose)
        if not isinstance(self.runtime, ContainerObservation):
            return  # an app without containers, or an engine that cannot be watched
        runtime: Any = self.runtime  # a DockerRuntime: lifecycle and observation
        mine = {labels.OWNER: self.owner}
        self.usage = UsageMeter(
            self.state_dir / "usage.db", runtime, mine, interval=self._usage_interval
        )
        await self.usage.start()
        self._closers.append(self.usage.aclose)
        self._watcher = EngineWatcher(
            runtime,
            mine,
            self.sink,
            on_event=self.usage.on_event,
            cursor=self.state_dir / "logs.cursor",
            delivered=self.logs.newest_lines,
            positions=self.logs.file_positions,
        )
        await self._watcher.start()
        self._closers.append(self._watcher.aclose)

    async def aclose(self) -> None:
        """Everything ends, the last one started first; the first error is raised."""
        error: BaseException | None = None
        while self._closers:
            try:
                await self._closers.pop()()
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise DockyardError(f"closing the dev log store or meter: {error}") from error

    async def __aenter__(self) -> LocalObservation:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class LocalDashboardSource:
    """The dashboard's view of the one app ``dockyard dev`` serves. Login takes the token
    dev printed when it started (``secrets.compare_digest``)."""

    def __init__(self, app: Any, observation: LocalObservation, token: str) -> None:
        self.app = app
        self.observation = observation
        self.token = token
        self.views = InstanceViews(observation.logs, observation.usage)
        self.rates = RequestRates()

    def check_token(self, token: str) -> bool:
        return secrets.compare_digest(token.encode(), self.token.encode())

    async def overview(self) -> list[AppSummary]:
        name = self.app.config.name
        rate, errors = self.rates.update(name, self.app.metrics.render().decode())
        live = sum(1 for row in await self.instances(name) if row.state != "stopped")
        return [AppSummary(name, None, rate, errors, live, self.views.cost_today(name))]

    async def app_detail(self, app: str) -> AppDetail | None:
        if app != self.app.config.name:
            return None
        classes = class_summaries(self.app.config.containers, await self.instances(app))
        return AppDetail(name=app, active_version=None, classes=classes)

    async def instances(self, app: str) -> list[InstanceRow]:
        if app != self.app.config.name:
            return []
        return self.views.rows(app, self.app.instances())

    async def instance(self, app: str, container_id: str) -> InstanceDetail | None:
        return self.views.detail(app, await self.instances(app), container_id)

    async def stop_instance(self, app: str, container_id: str, *, destroy: bool) -> None:
        if app != self.app.config.name or not await self.app.stop_container(
            container_id, destroy=destroy
        ):
            raise LookupError(f"app {app!r} runs no container {container_id!r}")

    def logs(self, query: LogQuery) -> list[LogRecord]:
        return self.observation.logs.query(query)

    def tail(self, query: LogQuery) -> AsyncIterator[LogRecord]:
        return self.observation.logs.tail(query)

    def usage(self, *, app: str | None, since: float | None, by: str) -> list[UsageRow]:
        meter = self.observation.usage
        return meter.usage(app=app, since=since, by=by) if meter is not None else []
