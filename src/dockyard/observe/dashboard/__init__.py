"""The web dashboard on the admin listener: ``make_dashboard(source)`` returns an aiohttp
application to mount with ``add_subapp("/ui", ...)``; ``source`` is a ``DashboardSource``."""

from dockyard.observe.dashboard.app import logout_everyone, make_dashboard
from dockyard.observe.dashboard.source import (
    INSTANCE_STATES,
    AppDetail,
    AppSummary,
    ClassSummary,
    DashboardSource,
    InstanceDetail,
    InstanceRow,
    RolloutProgress,
    Sample,
    VersionSummary,
)

__all__ = [
    "INSTANCE_STATES",
    "AppDetail",
    "AppSummary",
    "ClassSummary",
    "DashboardSource",
    "InstanceDetail",
    "InstanceRow",
    "RolloutProgress",
    "Sample",
    "VersionSummary",
    "logout_everyone",
    "make_dashboard",
]
