"""One Dockyard node (``dockyard serve``): every part of the platform, put together.

``Node`` owns the data folder (locked while it runs), the store, the secret box, the
admin tokens, the registry it supervises, the engine, the per-app engine API, the app
processes, the rollouts, the control plane on the admin listener and the router on the
application listener. It is also the ``NodeControl`` the API calls into: activating a
version (the one place a version goes live) and deleting an app.

Start order: state, registry, engine; then every app on its active version; then
interrupted rollouts resume; the router opens last, so no request meets a half-started
node. Stop order is the reverse; containers are stopped (SIGTERM, SIGKILL after the
grace period) by the app processes as they end. A SIGKILLed node leaves its containers
running: the next start adopts them (by the node's owner label), never duplicates them.

Over 400 lines: it is the assembly of the node: one class wiring the store, registry,
engine API, app processes, router, watcher, meter and admin API, in start and stop
order. Splitting it would split that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets as random
import shutil
import ssl
import stat
import sys
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from ..containers import labels
from ..containers.runtime import ContainerInfo, ContainerObservation, ContainerRuntime
from ..errors import DockyardError
from ..observe.dashboard import logout_everyone, make_dashboard
from ..observe.logstore import LogStore
from ..observe.metrics import NodeCollector, merge_expositions
from ..observe.records import LogRecord
from ..observe.usage import UsageMeter
from ..observe.watch import EngineWatcher
from ..settings import NodeSettings
from .api import API_PREFIX, make_admin_app
from .appproc import AppEndpoint, AppProcesses, Launch
from .dashboard_source import NodeDashboardSource
from .engine_api import EngineApi
from .interpreter import app_interpreter
from .observe_api import add_observe_routes
from .paths import NodePaths
from .registry import Registry
from .rollout import Rollouts
from .router import Router
from .secrets import SecretBox
from .store import AppRecord, NodeStore, RolloutRecord, VersionRecord
from .tokens import Tokens

__all__ = ["Node"]

log = logging.getLogger("dockyard.node")

# The dashboard's place on the admin listener.
DASHBOARD_PREFIX = "/ui"


class Node:
    def __init__(self, settings: NodeSettings, *, runtime: ContainerRuntime | None = None) -> None:
        self.settings = settings
        self.paths = NodePaths(Path(settings.data_dir))
        self.max_upload_bytes = settings.max_upload_bytes
        self._runtime = runtime
        self._lock: IO[str] | None = None
        self._admin: web.AppRunner | None = None
        self._router: Router | None = None
        self._engine_api: EngineApi | None = None
        self._processes: AppProcesses | None = None
        self._rollouts: Rollouts | None = None
        self._registry: Registry | None = None
        self._store: NodeStore | None = None
        self.secrets = SecretBox(self.paths.secret_key)
        self.owner = ""
        self.admin_address = ""
        self.listen_port = 0
        # Host name -> app, from every active version's routes (see resolve()).
        self._routes: dict[str, str] = {}
        self.first_token: str | None = None
        self._python: str | None = None
        self._engine_open: set[str] = set()
        self._logs: LogStore | None = None
        self._usage: UsageMeter | None = None
        self._watcher: EngineWatcher | None = None
        self.metrics = CollectorRegistry(auto_describe=False)
        self._dashboard: web.Application | None = None

    # The parts, once started (the API reaches them through these).

    @property
    def store(self) -> NodeStore:
        assert self._store is not None, "Node.start() was not called"
        return self._store

    @property
    def tokens(self) -> Tokens:
        return Tokens(self.store)

    @property
    def registry(self) -> Registry:
        assert self._registry is not None, "Node.start() was not called"
        return self._registry

    @property
    def runtime(self) -> ContainerRuntime:
        assert self._runtime is not None, "Node.start() was not called"
        return self._runtime

    @property
    def logs(self) -> LogStore:
        assert self._logs is not None, "Node.start() was not called"
        return self._logs

    @property
    def usage(self) -> UsageMeter:
        assert self._usage is not None, "Node.start() was not called"
        return self._usage

    @property
    def processes(self) -> AppProcesses:
        assert self._processes is not None, "Node.start() was not called"
        return self._processes

    @property
    def rollouts(self) -> Rollouts:
        assert self._rollouts is not None, "Node.start() was not called"
        return self._rollouts

    # Lifecycle

    async def start(self) -> None:
        self._check_reachable_by_apps()
        self.paths.ensure()
        self._lock_data_dir()
        self._store = NodeStore(self.paths.db)
        self.first_token = self.tokens.first_start(os.environ.get("DOCKYARD_ADMIN_TOKEN"))
        self.owner = self.store.get_meta("owner") or ""
        if not self.owner:
            # Unique to this node: its containers are never another Dockyard's.
            self.owner = "node-" + random.token_hex(8)
            self.store.set_meta("owner", self.owner)
        if self._runtime is None:
            from ..containers.docker import DockerRuntime

            self._runtime = DockerRuntime(request_timeout=5.0)
        await self._start_observing()
        self._registry = Registry(self.paths.registry_dir)
        await self._registry.start()
        self._engine_api = EngineApi(self.runtime, self.owner, before_stop=self.usage.read_now)
        self._processes = AppProcesses(
            restart_initial=self.settings.restart_initial,
            restart_max=self.settings.restart_max,
            sink=self.logs,
        )
        self._rollouts = Rollouts(self.store, self._processes, run_ref=self.run_ref, sink=self.logs)
        self.metrics.register(
            NodeCollector(
                rollouts=self.rollouts.in_progress,
                containers=self._container_readings,
                logs=self._log_statistics,
            )
        )

        admin = make_admin_app(self)
        add_observe_routes(admin, self, API_PREFIX)
        self._dashboard = make_dashboard(NodeDashboardSource(self), prefix=DASHBOARD_PREFIX)
        admin.add_subapp(DASHBOARD_PREFIX, self._dashboard)
        self._admin = web.AppRunner(admin, access_log=None)
        await self._admin.setup()
        host, port = self.settings.admin
        site = web.TCPSite(
            self._admin,
            host,
            port,
            ssl_context=_tls(self.settings.admin_tls_cert, self.settings.admin_tls_key),
        )
        await site.start()
        bound = self._admin.addresses[0][1]  # the port chosen when --admin asked for 0
        self.admin_address = f"{host}:{bound}"

        apps = [app for app in self.store.list_apps() if app.active_version is not None]
        results = await asyncio.gather(
            *(self._run_active(app) for app in apps), return_exceptions=True
        )
        for app, result in zip(apps, results, strict=True):
            if isinstance(result, BaseException):
                log.error("App %s did not start on its active version: %s", app.name, result)
        await self.rollouts.resume_all()

        lhost, lport = self.settings.listen
        self._router = Router(
            self.resolve,
            host=lhost,
            port=lport,
            ssl=_tls(self.settings.tls_cert, self.settings.tls_key),
        )
        self.listen_port = await self._router.start()

    async def stop(self) -> None:
        """Drain: the router stops taking connections, app processes finish their requests
        and stop their containers, then the registry and the state close."""
        if self._router is not None:
            await self._router.stop()
        if self._rollouts is not None:
            await self._rollouts.aclose()
        if self._processes is not None:
            await self._processes.aclose()
        if self._engine_api is not None:
            await self._engine_api.aclose()
        if self._admin is not None:
            await self._admin.cleanup()
        if self._registry is not None:
            await self._registry.stop()
        # After the app processes: their containers' last lines and readings come in
        # while they stop.
        if self._watcher is not None:
            await self._watcher.aclose()
        if self._usage is not None:
            await self._usage.aclose()
        if self._logs is not None:
            await self._logs.aclose()
        if self._runtime is not None:
            await self._runtime.aclose()
        if self._store is not None:
            self._store.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def _start_observing(self) -> None:
        """The log store, the meter and the engine watcher that feeds both: before any app
        runs, so no container line or run goes unrecorded."""
        settings = self.settings
        self._logs = LogStore(
            self.paths.logs_db,
            retention_seconds=settings.log_retention,
            max_bytes=settings.log_max_bytes,
        )
        await self._logs.start()
        runtime = self.runtime
        if not isinstance(runtime, ContainerObservation):
            raise DockyardError("the container engine cannot be observed (events, stats)")
        mine = {labels.OWNER: self.owner}
        self._usage = UsageMeter(
            self.paths.usage_db, runtime, mine, interval=settings.usage_interval
        )
        await self._usage.start()
        self._watcher = EngineWatcher(
            runtime,
            mine,
            self._logs,
            on_event=self._usage.on_event,
            cursor=self.paths.log_cursor,
            delivered=self._logs.newest_lines,
            positions=self._logs.file_positions,
        )
        await self._watcher.start()

    def _container_readings(self) -> list[dict[str, Any]]:
        """Per app and class: CPU seconds and egress over every metered run, memory now."""
        readings: dict[tuple[str, str], dict[str, Any]] = {}
        for app in self.store.list_apps():
            for row in self.usage.usage(app=app.name, by="class"):
                readings[(app.name, row.key)] = {
                    "app": app.name,
                    "class_name": row.key,
                    "cpu_seconds": row.vcpu_seconds,
                    "tx_bytes": row.egress_bytes,
                    "memory_bytes": 0,
                }
        for live in self.usage.live():
            key = (str(live.get("app", "")), str(live.get("class_name", "")))
            entry = readings.setdefault(
                key, {"app": key[0], "class_name": key[1], "cpu_seconds": 0.0, "tx_bytes": 0}
            )
            entry["memory_bytes"] = entry.get("memory_bytes", 0) + int(
                live.get("memory_bytes") or 0
            )
        return list(readings.values())

    def _log_statistics(self) -> dict[str, int]:
        stats = self.logs.statistics()
        return {
            "records": int(getattr(stats, "rows", 0)),
            "bytes": int(getattr(stats, "bytes", 0)),
            "dropped": int(getattr(stats, "dropped", 0)),
        }

    async def metrics_text(self) -> bytes:
        """``/metrics``: the node's series and every serving app process's."""
        apps = [app.name for app in self.store.list_apps() if self.processes.endpoint(app.name)]
        texts = await asyncio.gather(
            *(self.processes.metrics(app) for app in apps), return_exceptions=True
        )
        for app, text in zip(apps, texts, strict=True):
            if isinstance(text, BaseException):
                log.warning("No metrics from app %s: %s", app, text)
        return merge_expositions(self.metrics, [t for t in texts if isinstance(t, str)])

    def record(self, app: str, event: str, message: str, **fields: Any) -> None:
        """A platform event of the node's own (a deploy)."""
        if self._logs is not None:
            self._logs.emit(
                LogRecord(
                    app=app,
                    message=message,
                    source="platform",
                    stream="event",
                    event=event,
                    version=fields.get("version"),
                    fields=fields,
                )
            )

    def _check_reachable_by_apps(self) -> None:
        """App processes run as their own uids and must reach their folders in the data
        folder: refuse, naming the folder, rather than fail at the first deploy."""
        if os.geteuid() != 0 or not self.settings.separate_users:
            return
        for folder in self.paths.root.resolve().parents:
            if folder.exists() and not folder.stat().st_mode & stat.S_IXOTH:
                raise DockyardError(
                    f"the data folder {self.paths.root} is inside {folder}, which other "
                    "users cannot enter (mode "
                    f"{stat.S_IMODE(folder.stat().st_mode):o}); apps run as their own users "
                    "and need to reach their folders: choose a data folder elsewhere "
                    "(e.g. /var/lib/dockyard) or allow traversal (chmod o+x)"
                )

    def _lock_data_dir(self) -> None:
        """One node per data folder: a second would fight the first over its containers."""
        # 0600 like everything at the data folder's root: app uids may pass through it.
        descriptor = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(descriptor, 0o600)  # a lock file an older version left 0644
        lock = open(descriptor, "a+")  # held for the node's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise DockyardError(
                f"{self.paths.root} is in use by another dockyard serve ({holder})"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        self._lock = lock

    # Routing

    def resolve(self, host: str) -> AppEndpoint | None:
        """The app a request's Host names: ``<app>.<domain>``, or a route of its active
        version; None when no app answers there."""
        app = self._routes.get(host)
        if app is None:
            suffix = "." + self.settings.domain
            if host.endswith(suffix):
                app = host[: -len(suffix)]
        if app is None:
            return None
        endpoint = self.processes.endpoint(app)
        if endpoint is None and self.store.get_app(app) is None:
            return None
        # Known app that is not serving right now: the router answers 503.
        return endpoint or AppEndpoint(app, Path("/nonexistent"), Path("/nonexistent"))

    def _set_routes(self, app: str, version: VersionRecord | None) -> None:
        self._routes = {h: a for h, a in self._routes.items() if a != app}
        if version is None:
            return
        for host in version.config.get("routes", []):
            self._routes[host] = app

    # NodeControl (what the API calls)

    def run_ref(self, image: str) -> str:
        """What the engine runs for a version's image: by digest, from the node's registry."""
        return f"{self.registry.address}/{image}"

    async def activate(self, app: str, number: int, strategy: str) -> RolloutRecord | None:
        """Make version ``number`` the one that serves ``app``: its process runs the new
        code before the switch (a version that fails to start leaves the old one serving),
        then a rollout replaces containers whose image changed."""
        record = self.store.get_app(app)
        version = self.store.get_version(app, number)
        if record is None or version is None:
            raise DockyardError(f"app {app!r} has no version {number}")
        previous = (
            self.store.get_version(app, record.active_version)
            if record.active_version is not None
            else None
        )
        await self._run(record, version)
        self.store.set_active_version(app, number)
        self._set_routes(app, version)
        self.record(
            app,
            "deploy",
            f"version {number} is live" + (f" (was {previous.number})" if previous else ""),
            version=number,
            images=dict(version.images),
        )
        if previous is None or strategy == "none":
            return None
        changed = sorted(
            name for name, image in version.images.items() if previous.images.get(name) != image
        )
        if not changed:
            return None
        return await self.rollouts.start(app, number, previous.number, strategy, changed)

    async def delete_app(self, app: str) -> None:
        """Remove an app: its process, its containers, its versions, secrets and storage."""
        await self.rollouts.cancel(app)
        await self.processes.destroy(app)
        if self._engine_api is not None:
            await self._engine_api.close(app)
            self._engine_open.discard(app)
        self.store.delete_app(app)
        self._set_routes(app, None)
        shutil.rmtree(self.paths.app_dir(app), ignore_errors=True)
        shutil.rmtree(self.paths.app_run_dir(app), ignore_errors=True)

    def tokens_rotated(self) -> None:
        """Dashboard sessions were opened with an old token: they end too."""
        if self._dashboard is not None:
            logout_everyone(self._dashboard)

    async def stop_container(self, info: ContainerInfo, *, destroy: bool = False) -> None:
        """Through the object that owns it, so its end is recorded as a stop (not an exit)
        and its requests drain; the engine directly for a container no app process runs."""
        app = info.labels.get(labels.APP, "")
        if await self.processes.stop_container(app, info.id, destroy=destroy):
            return
        if destroy:
            await self.runtime.kill(info.id)
        else:
            await self.runtime.stop(info.id, self.settings.container_stop_grace)

    async def _run_active(self, app: AppRecord) -> None:
        assert app.active_version is not None
        version = self.store.get_version(app.name, app.active_version)
        if version is None:
            raise DockyardError(f"active version {app.active_version} is missing")
        await self._run(app, version)
        self._set_routes(app.name, version)

    async def _run(self, app: AppRecord, version: VersionRecord) -> None:
        uid = app.uid if (os.geteuid() == 0 and self.settings.separate_users) else None
        run_dir = self.paths.app_run_dir(app.name)
        state_dir = self.paths.state_dir(app.name)
        for directory in (run_dir, state_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if uid is not None:
                os.chown(directory, uid, uid)
        if uid is not None:
            # The app reads its bundles (root's, read-only to it) through its own folder,
            # which no other app's uid may enter.
            app_dir = self.paths.app_dir(app.name)
            os.chown(app_dir, 0, uid)
            app_dir.chmod(0o750)
        assert self._engine_api is not None
        if app.name not in self._engine_open:
            # Once per app: reopening would cut the long polls its supervisors hold.
            # The allowed images are read at each call, so new versions need nothing.
            await self._engine_api.open(
                app.name,
                run_dir / "engine.sock",
                allowed_images=lambda: self._allowed_images(app.name),
                uid=uid,
            )
            self._engine_open.add(app.name)
        ciphertexts = self.store.secret_ciphertexts(app.name)
        launch = Launch(
            app=app.name,
            version=version.number,
            owner=self.owner,
            bundle_dir=str(self.paths.bundle_dir(app.name, version.bundle_hash)),
            state_dir=str(state_dir),
            run_dir=str(run_dir),
            images={name: self.run_ref(image) for name, image in version.images.items()},
            vars=dict(version.vars),
            secrets={
                name: self.secrets.decrypt(ciphertexts[name])
                for name in version.secret_names
                if name in ciphertexts
            },
            uid=uid,
            python=sys.executable if uid is None else self._app_python(),
            settings={
                "stop_grace": self.settings.container_stop_grace,
                "drain_grace": self.settings.drain_grace,
            },
        )
        await self.processes.ensure(launch)

    def _app_python(self) -> str:
        if self._python is None:
            self._python = app_interpreter(self.paths.root / "runtime")
        return self._python

    def _allowed_images(self, app: str) -> set[str]:
        return {
            self.run_ref(image)
            for version in self.store.list_versions(app)
            for image in version.images.values()
        }

    def info(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "domain": self.settings.domain,
            "registry": self.admin_address,
            "apps": len(self.store.list_apps()),
        }


def _tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with contextlib.suppress(AttributeError):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
