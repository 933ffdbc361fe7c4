"""Cloudflare's bindings beside Durable Objects: KV, D1, static assets and cron triggers.

``Bindings(config, state_dir)`` builds them from a project's wrangler config; the app
adds ``bindings.env`` to the worker's ``env``, routes each request through
``bindings.serve(request, worker)`` (static assets answer before the worker, as on
Cloudflare), and brackets its life with ``start(scheduled)`` / ``stop()``; cron triggers
call ``scheduled(controller)`` on time.

State lives under the app's state folder: ``kv/<id or binding>.sqlite`` and
``d1/<database_name>.sqlite``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dockyard.compat.hibernation import HIBERNATION
from dockyard.config import Config
from dockyard.http import Request, Response

from .assets import Assets
from .cron import CronTriggers, ScheduledController
from .d1 import D1Database
from .kv import KvNamespace

__all__ = [
    "Assets",
    "Bindings",
    "D1Database",
    "KvNamespace",
    "ScheduledController",
    "build_bindings",
    "d1_database",
]

Handler = Callable[[Request], Awaitable[Response]]
Scheduled = Callable[[ScheduledController], Awaitable[Any]]


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def d1_database(config: Config, state_dir: Path, name: str) -> D1Database | None:
    """The D1 database called ``name`` (its database_name or its binding), or None."""
    for database in config.d1_databases:
        if name in (database.name, database.binding):
            path = state_dir / "d1" / f"{_file_name(database.name)}.sqlite"
            return D1Database(path, name=database.name)
    return None


class Bindings:
    """The KV, D1 and assets bindings and the cron triggers of one app."""

    def __init__(self, config: Config, state_dir: Path) -> None:
        self.kv = {
            ns.binding: KvNamespace(
                state_dir / "kv" / f"{_file_name(ns.id or ns.binding)}.sqlite", name=ns.binding
            )
            for ns in config.kv_namespaces
        }
        self.d1: dict[str, D1Database] = {}
        for database in config.d1_databases:
            found = d1_database(config, state_dir, database.binding)
            assert found is not None
            self.d1[database.binding] = found
        self.assets: Assets | None = None
        spec = config.assets
        if spec is not None and spec.directory is not None:
            self.assets = Assets(
                config.config_path.parent / spec.directory,
                html_handling=spec.html_handling,
                not_found_handling=spec.not_found_handling,
                run_worker_first=spec.run_worker_first,
            )
        self._assets_binding = spec.binding if spec is not None else None
        self.crons = list(config.triggers.crons)
        self._triggers: CronTriggers | None = None

    @property
    def env(self) -> dict[str, object]:
        """What these bindings add to the worker's env, by binding name."""
        values: dict[str, object] = {**self.kv, **self.d1}
        if self._assets_binding is not None and self.assets is not None:
            values[self._assets_binding] = self.assets
        return values

    async def start(self, scheduled: Scheduled | None = None) -> None:
        """Start the cron triggers (if any), which call ``scheduled(controller)``."""
        if self.crons and scheduled is not None and self._triggers is None:
            self._triggers = CronTriggers(self.crons, scheduled)
            await self._triggers.start()

    async def stop(self) -> None:
        triggers, self._triggers = self._triggers, None
        if triggers is not None:
            await triggers.stop()
        await HIBERNATION.stop()
        for namespace in self.kv.values():
            namespace.close()
        for database in self.d1.values():
            database.close()

    async def __aenter__(self) -> Bindings:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve(self, request: Request, worker: Handler) -> Response:
        """Static assets first (unless run_worker_first matches), then the worker."""
        assets = self.assets
        if assets is None or assets.worker_first(request.path):
            return await worker(request)
        answer = assets.match(request)
        if answer is not None:
            return answer
        return await worker(request)


def build_bindings(config: Config, state_dir: Path) -> dict[str, object]:
    """The env entries for ``config``'s KV, D1 and assets bindings (without cron)."""
    return Bindings(config, state_dir).env
