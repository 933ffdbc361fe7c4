"""Where a node keeps its state: one data folder, laid out by ``NodePaths``.

    <root>/                 0711  the node's; others may only pass through (see below)
        node.db             0600  the store (SQLite, WAL: node.db-wal, node.db-shm beside it)
        secret.key          0600  the Fernet key that encrypts app secrets at rest
        serve.lock                held by the running ``dockyard serve``
        registry/           0700  the registry's config.yml and storage/
        uploads/            0700  bundles being uploaded, one file per deploy id
        observe/            0700  logs.db (log store), usage.db (metering), logs.cursor
        apps/               0711  apps/<app>/state (the app's storage), bundles/<hash> (its code)
        run/                0711  run/<app>/*.sock (hand-off, http, control, engine)

Why 0711 and not 0700 on root, apps/ and run/: when the node runs as root each app's
process runs as its own uid, and must reach ``apps/<app>`` and ``run/<app>`` (chowned to
that uid by the node). Execute-only lets it traverse to a path it already knows without
listing the folder, so an app cannot discover other apps' names, and everything with
content (the db, the key, the registry, uploads, other apps' folders) stays 0700/0600.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument

__all__ = ["APP_NAME_RULE", "NodePaths", "default_data_dir", "validate_app_name"]

# As wrangler names workers: one DNS label, so <app>.<domain> is a valid host name.
_APP_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
APP_NAME_RULE = (
    "1 to 63 lowercase letters, digits and hyphens, starting and ending with a letter or digit"
)
_BUNDLE_HASH = re.compile(r"[0-9a-f]{64}")

_TRAVERSE = 0o711
_PRIVATE = 0o700


def validate_app_name(name: str) -> str:
    """``name`` when it is a valid app name, else InvalidArgument saying the rule."""
    if not isinstance(name, str) or _APP_NAME.fullmatch(name) is None:
        raise InvalidArgument(f"invalid app name {name!r}: use {APP_NAME_RULE}")
    return name


def default_data_dir() -> Path:
    """/var/lib/dockyard as root, else $XDG_DATA_HOME/dockyard (~/.local/share/dockyard)."""
    if os.geteuid() == 0:
        return Path("/var/lib/dockyard")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dockyard"


@dataclass(frozen=True)
class NodePaths:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "node.db"

    @property
    def secret_key(self) -> Path:
        return self.root / "secret.key"

    @property
    def registry_dir(self) -> Path:
        return self.root / "registry"

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def lock(self) -> Path:
        return self.root / "serve.lock"

    @property
    def observe_dir(self) -> Path:
        return self.root / "observe"

    @property
    def logs_db(self) -> Path:
        return self.observe_dir / "logs.db"

    @property
    def usage_db(self) -> Path:
        return self.observe_dir / "usage.db"

    @property
    def log_cursor(self) -> Path:
        return self.observe_dir / "logs.cursor"

    @property
    def apps_dir(self) -> Path:
        return self.root / "apps"

    # Per app. The name is checked here too: it becomes a path component, so a name
    # like "../x" must never get this far.

    def app_dir(self, app: str) -> Path:
        return self.apps_dir / validate_app_name(app)

    def state_dir(self, app: str) -> Path:
        return self.app_dir(app) / "state"

    def bundle_dir(self, app: str, bundle_hash: str) -> Path:
        if _BUNDLE_HASH.fullmatch(bundle_hash) is None:
            raise InvalidArgument(f"invalid bundle hash {bundle_hash!r}: 64 lowercase hex digits")
        return self.app_dir(app) / "bundles" / bundle_hash

    def app_run_dir(self, app: str) -> Path:
        return self.run_dir / validate_app_name(app)

    def ensure(self) -> None:
        """Create the node-level folders (not the per-app ones) and set their modes,
        also on folders that already existed (the umask or an older node may differ)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for directory, mode in (
            (self.root, _TRAVERSE),
            (self.apps_dir, _TRAVERSE),
            (self.run_dir, _TRAVERSE),
            (self.registry_dir, _PRIVATE),
            (self.uploads_dir, _PRIVATE),
            (self.observe_dir, _PRIVATE),
        ):
            directory.mkdir(mode=mode, exist_ok=True)
            os.chmod(directory, mode)
