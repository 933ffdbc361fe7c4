"""The labels Dockyard puts on every engine container: its one schema.

The platform can rebuild its whole picture of what runs from these labels alone
(after a crash, a restart, an engine outage), and they say who owns a container:
``dockyard.owner`` is unique to one running Dockyard (a dev state folder, or a node),
so two projects that share an app name never touch each other's containers.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

__all__ = [
    "APP",
    "CLASS",
    "DEPLOY",
    "DISK_MB",
    "MEMORY_MIB",
    "NAME",
    "OBJECT",
    "OWNER",
    "RESERVED_PREFIX",
    "VCPU",
    "VERSION",
    "dev_owner",
]

# Every label Dockyard sets starts with this; a class's own labels may not.
RESERVED_PREFIX = "dockyard."

APP = "dockyard.app"
CLASS = "dockyard.class"
OBJECT = "dockyard.object_id"
NAME = "dockyard.object_name"
# The content hash of the image it runs (what adoption and rollouts compare).
VERSION = "dockyard.version"
# On a node: the number of the deployed version whose app process started it.
DEPLOY = "dockyard.deploy"
OWNER = "dockyard.owner"
# The instance type's provisioned size, as decimal strings: metering reads nothing else.
VCPU = "dockyard.vcpu"
MEMORY_MIB = "dockyard.memory_mib"
DISK_MB = "dockyard.disk_mb"


def dev_owner(state_dir: Path) -> str:
    """The owner of a ``dockyard dev`` app's containers: this machine and state folder.

    Unique to one running Dockyard (the state folder is locked while it runs).
    """
    where = f"{socket.gethostname()}:{Path(state_dir).resolve()}"
    return "dev-" + hashlib.sha256(where.encode()).hexdigest()[:16]
