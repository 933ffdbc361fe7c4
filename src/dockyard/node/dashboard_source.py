"""What the dashboard shows of a node (observe/dashboard/source.py's ``DashboardSource``):
apps and versions from the store, instances from the app processes, CPU and memory
from the meter, exit codes and logs from the log store, costs from the meter.

Request rates come from the app processes' own counters (their ``/metrics``), read when
a page asks and kept for a few minutes, so a rate is the change between two readings.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ContainerConfig, load_config
from ..containers import labels
from ..errors import ContainerGone, DockyardError
from ..observe.dashboard.source import (
    AppDetail,
    AppSummary,
    ClassSummary,
    InstanceDetail,
    InstanceRow,
    RolloutProgress,
    VersionSummary,
)
from ..observe.instances import InstanceViews, class_summaries
from ..observe.metrics import RequestRates
from ..observe.records import LogQuery, LogRecord, UsageRow

if TYPE_CHECKING:
    from .node import Node

__all__ = ["NodeDashboardSource"]


class NodeDashboardSource:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.views = InstanceViews(node.logs, node.usage)
        self.rates = RequestRates()

    def check_token(self, token: str) -> bool:
        return self.node.tokens.scope(token) == "admin"

    # -- apps -------------------------------------------------------------------------------

    async def overview(self) -> list[AppSummary]:
        summaries = []
        for app in self.node.store.list_apps():
            text = None
            if self.node.processes.endpoint(app.name) is not None:
                with contextlib.suppress(DockyardError):
                    text = await self.node.processes.metrics(app.name)
            rate, errors = self.rates.update(app.name, text)
            live = sum(1 for row in await self.instances(app.name) if row.state != "stopped")
            summaries.append(
                AppSummary(
                    name=app.name,
                    active_version=app.active_version,
                    requests_per_minute=rate,
                    error_rate=errors,
                    live_instances=live,
                    cost_today=self.views.cost_today(app.name),
                )
            )
        return summaries

    async def app_detail(self, app: str) -> AppDetail | None:
        record = self.node.store.get_app(app)
        if record is None:
            return None
        versions = self.node.store.list_versions(app)
        rollout = self.node.store.get_rollout(app)
        classes: list[ClassSummary] = []
        active = next((v for v in versions if v.number == record.active_version), None)
        if active is not None:
            bundle = self.node.paths.bundle_dir(app, active.bundle_hash)
            classes = class_summaries(_containers(bundle), await self.instances(app))
        return AppDetail(
            name=app,
            active_version=record.active_version,
            versions=[
                VersionSummary(
                    number=v.number,
                    created_at=v.created_at,
                    active=v.number == record.active_version,
                    images=[f"{name}: {image}" for name, image in sorted(v.images.items())],
                )
                for v in sorted(versions, key=lambda v: v.number, reverse=True)
            ],
            rollout=(
                RolloutProgress(
                    version=rollout.version,
                    status=rollout.state,
                    replaced=len(rollout.replaced),
                    total=rollout.total,
                )
                if rollout is not None
                else None
            ),
            classes=classes,
        )

    # -- instances --------------------------------------------------------------------------

    async def instances(self, app: str) -> list[InstanceRow]:
        if self.node.processes.endpoint(app) is None:
            return []
        try:
            supervised = await self.node.processes.instances(app)
        except DockyardError:
            return []  # the process is being replaced: the next refresh shows it
        return self.views.rows(app, [dataclasses.asdict(i) for i in supervised])

    async def instance(self, app: str, container_id: str) -> InstanceDetail | None:
        return self.views.detail(app, await self.instances(app), container_id)

    async def stop_instance(self, app: str, container_id: str, *, destroy: bool) -> None:
        info = None
        with contextlib.suppress(ContainerGone):
            info = await self.node.runtime.inspect(container_id)
        if (
            info is None
            or info.labels.get(labels.OWNER) != self.node.owner
            or info.labels.get(labels.APP) != app
        ):
            raise LookupError(f"app {app!r} has no container {container_id!r}")
        await self.node.stop_container(info, destroy=destroy)

    # -- logs and usage ---------------------------------------------------------------------

    def logs(self, query: LogQuery) -> list[LogRecord]:
        return self.node.logs.query(query)

    def tail(self, query: LogQuery) -> AsyncIterator[LogRecord]:
        return self.node.logs.tail(query)

    def usage(self, *, app: str | None, since: float | None, by: str) -> list[UsageRow]:
        return self.node.usage.usage(app=app, since=since, by=by)


@lru_cache(maxsize=64)
def _containers(bundle: Path) -> tuple[ContainerConfig, ...]:
    """A version's container classes (bundles never change once unpacked, so this is
    read once per version)."""
    try:
        return tuple(load_config(bundle).containers)
    except DockyardError:
        return ()
