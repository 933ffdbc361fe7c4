"""The dashboard's instance rows, made the same way on a node and in ``dockyard dev``:
what an app process supervises (``App.instances()``), the meter's latest reading of each
running container, and, for a stopped one, its last stop event in the log store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from .dashboard.source import ClassSummary, InstanceDetail, InstanceRow, InstanceState
from .records import LogQuery, LogRecord, UsageRow

if TYPE_CHECKING:
    from ..config import ContainerConfig

__all__ = ["InstanceViews", "class_summaries"]

# Supervisor phases as the dashboard names them.
_STATES: dict[str, InstanceState] = {
    "starting": "provisioning",
    "running": "running",
    "healthy": "healthy",
    "paused": "paused",
    "stopping": "stopping",
    "stopped": "stopped",
    "unknown": "running",  # the engine did not answer; the container was running
}
_STOPS = ("container.stop", "container.oom")


class _Logs(Protocol):
    def query(self, q: LogQuery) -> list[LogRecord]: ...


class _Meter(Protocol):
    def live(self) -> list[dict[str, Any]]: ...

    def samples(self, container_id: str) -> list[tuple[float, float, int]]: ...

    def usage(
        self, *, app: str | None = None, since: float | None = None, by: str = "app"
    ) -> list[UsageRow]: ...


class InstanceViews:
    def __init__(self, logs: _Logs, meter: _Meter | None) -> None:
        self.logs = logs
        self.meter = meter

    def rows(self, app: str, supervised: Iterable[Mapping[str, Any]]) -> list[InstanceRow]:
        """One row per object's container. The meter's readings cost no engine call: this
        runs every second for every open page, and the engine is slowest while
        containers start."""
        live = self.meter.live() if self.meter is not None else []
        readings = {r["container_id"]: r for r in live if r.get("app") == app}
        rows = []
        for instance in supervised:
            cid = instance.get("container_id") or ""
            exit_code = None
            if not cid:
                # Stopped: the row shows its last container, and how that one ended.
                query = LogQuery(app=app, object_id=str(instance["object_id"]))
                cid, exit_code = self.last_stop(query)
            reading = readings.get(cid, {})
            phase = str(instance.get("phase", "running"))
            starting = bool(instance.get("starting")) and phase in ("starting", "running")
            rows.append(
                InstanceRow(
                    app=app,
                    class_name=str(instance["class_name"]),
                    object_id=str(instance["object_id"]),
                    object_name=str(instance.get("name") or ""),
                    container_id=cid,
                    state="provisioning" if starting else _STATES.get(phase, "running"),
                    exit_code=exit_code,
                    started_at=reading.get("started_at"),
                    cpu_fraction=reading.get("cpu_fraction"),
                    memory_bytes=reading.get("memory_bytes"),
                )
            )
        return rows

    def detail(
        self, app: str, rows: Iterable[InstanceRow], container_id: str
    ) -> InstanceDetail | None:
        """The row of ``container_id`` with its samples; an ended container (its object
        may run another one since) from its events."""
        if not container_id:
            return None
        samples = self.meter.samples(container_id) if self.meter is not None else []
        for row in rows:
            if row.container_id == container_id:
                return InstanceDetail(row, samples)
        query = LogQuery(app=app, container_id=container_id, source="platform")
        records = self.logs.query(query)
        if not records:
            return None
        last = records[-1]
        _, exit_code = self.last_stop(query)
        row = InstanceRow(
            app=app,
            class_name=last.class_name,
            object_id=last.object_id,
            object_name=last.object_name,
            container_id=container_id,
            state="stopped",
            exit_code=exit_code,
            started_at=None,
            cpu_fraction=None,
            memory_bytes=None,
        )
        return InstanceDetail(row, samples)

    def cost_today(self, app: str) -> float:
        """What the app's containers cost since 00:00 UTC."""
        if self.meter is None:
            return 0.0
        midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return sum(r.cost_usd for r in self.meter.usage(app=app, since=midnight.timestamp()))

    def last_stop(self, query: LogQuery) -> tuple[str, int | None]:
        """The container id and exit code of the last stop event matching ``query``."""
        query = LogQuery(
            app=query.app,
            object_id=query.object_id,
            container_id=query.container_id,
            source="platform",
            limit=50,
        )
        for record in reversed(self.logs.query(query)):
            if record.event in _STOPS:
                code = record.fields.get("exit_code")
                return record.container_id, int(code) if isinstance(code, int | float) else None
        return "", None


def class_summaries(
    containers: Iterable[ContainerConfig], rows: Iterable[InstanceRow]
) -> list[ClassSummary]:
    """The app page's container classes, with how many of each run now."""
    live: dict[str, int] = {}
    for row in rows:
        if row.state != "stopped":
            live[row.class_name] = live.get(row.class_name, 0) + 1
    return [
        ClassSummary(
            c.class_name,
            c.instance_type if isinstance(c.instance_type, str) else "custom",
            int(c.max_instances),
            live.get(c.class_name, 0),
        )
        for c in containers
    ]
