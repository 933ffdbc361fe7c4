"""What the dashboard reads and does, as one Protocol: the node (or ``dockyard dev``, or a
test) passes an object with these methods to ``make_dashboard``. The dashboard holds no
state of its own but its sessions; every page asks the source afresh.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from dockyard.observe.records import LogQuery, LogRecord, UsageRow

__all__ = [
    "INSTANCE_STATES",
    "AppDetail",
    "AppSummary",
    "ClassSummary",
    "DashboardSource",
    "InstanceDetail",
    "InstanceRow",
    "InstanceState",
    "RolloutProgress",
    "Sample",
    "VersionSummary",
]

InstanceState = Literal[
    "provisioning", "running", "healthy", "sleeping", "paused", "stopping", "stopped"
]
INSTANCE_STATES: tuple[InstanceState, ...] = (
    "provisioning",
    "running",
    "healthy",
    "sleeping",
    "paused",
    "stopping",
    "stopped",
)

# (Unix time, CPU as a fraction of one vCPU, memory bytes)
Sample = tuple[float, float, int]


@dataclass(frozen=True, slots=True)
class AppSummary:
    name: str
    active_version: int | None
    requests_per_minute: float
    error_rate: float  # 0..1, over the same window as requests_per_minute
    live_instances: int
    cost_today: float  # USD since 00:00 UTC


@dataclass(frozen=True, slots=True)
class VersionSummary:
    number: int
    created_at: float
    active: bool
    images: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RolloutProgress:
    version: int
    status: str  # e.g. "in_progress", "done", "failed", "rolled_back"
    replaced: int
    total: int


@dataclass(frozen=True, slots=True)
class ClassSummary:
    name: str
    instance_type: str
    max_instances: int
    live: int


@dataclass(frozen=True, slots=True)
class AppDetail:
    name: str
    active_version: int | None
    versions: list[VersionSummary] = field(default_factory=list)
    rollout: RolloutProgress | None = None
    classes: list[ClassSummary] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class InstanceRow:
    app: str
    class_name: str
    object_id: str
    object_name: str
    container_id: str
    state: InstanceState
    exit_code: int | None
    started_at: float | None
    cpu_fraction: float | None
    memory_bytes: int | None


@dataclass(frozen=True, slots=True)
class InstanceDetail:
    row: InstanceRow
    samples: list[Sample] = field(default_factory=list)  # oldest first


class DashboardSource(Protocol):
    """Everything the dashboard needs from the node. Methods return None for an unknown
    app or instance (the page answers 404); ``stop_instance`` on an unknown one raises
    ``LookupError``. ``check_token`` must compare in constant time."""

    def check_token(self, token: str) -> bool: ...

    async def overview(self) -> list[AppSummary]: ...

    async def app_detail(self, app: str) -> AppDetail | None: ...

    async def instances(self, app: str) -> list[InstanceRow]: ...

    async def instance(self, app: str, container_id: str) -> InstanceDetail | None: ...

    async def stop_instance(self, app: str, container_id: str, *, destroy: bool) -> None: ...

    def logs(self, query: LogQuery) -> list[LogRecord]: ...

    def tail(self, query: LogQuery) -> AsyncIterator[LogRecord]: ...

    def usage(self, *, app: str | None, since: float | None, by: str) -> list[UsageRow]: ...
