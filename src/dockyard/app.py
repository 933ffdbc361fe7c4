"""One Dockyard application on this node: config, worker, Durable Objects and containers.

``App`` is what ``dockyard dev`` runs: ``start()`` loads the config and the worker,
opens the object host and prepares the containers; ``handle(request)`` runs the
worker; ``reload()`` re-imports the worker after an edit; ``stop()`` ends everything
the app started. Its settings and its container engine are given to it, so the same
``App`` runs on one engine in dev and, later, on a node's supervisor API or a cluster.

Over 400 lines: App wires config, worker, objects, bindings and containers for one
application, and owns their start, reload and stop order; the helpers at the end serve
only that.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from .bindings import Bindings, ScheduledController
from .config import Config, config_error, load_config, main_names
from .containers import ContainerManager, labels
from .containers.container import CF_SWITCH_PORT_HEADER, SWITCH_PORT_HEADER
from .containers.runtime import ContainerRuntime
from .containers.supervisor import ContainerSupervisor
from .errors import DockyardError, WorkerError, error_id
from .http import Request, Response, error_response
from .objects import ObjectHost
from .objects.files import OpenFiles
from .objects.migrations import ClassMigrations, MigrationStep
from .observe.metrics import AppMetrics
from .observe.records import LogRecord, LogSink
from .settings import Settings
from .worker import Env, ExecutionContext, Worker, load_worker

__all__ = ["App"]

log = logging.getLogger("dockyard.app")
# wrangler dev --test-scheduled answers on both.
SCHEDULED_PATHS = ("/__scheduled", "/cdn-cgi/handler/scheduled")


class App:
    def __init__(
        self,
        project_dir: Path | str,
        *,
        config_path: Path | str | None = None,
        settings: Settings | None = None,
        runtime: ContainerRuntime | None = None,
        owner: str | None = None,
        image_overrides: Mapping[str, str] | None = None,
        vars: Mapping[str, Any] | None = None,
        secrets: Mapping[str, str] | None = None,
        sink: LogSink | None = None,
    ) -> None:
        """``owner``, ``image_overrides``, ``vars`` and ``secrets`` are how a node runs a
        deployed version: its containers' owner label, the pushed images by class (nothing
        is built), and the version's vars and decrypted secrets (instead of the config's
        vars and ``.dev.vars``). ``sink`` receives the platform events (containers
        started, stopped, failed); ``metrics`` counts them too."""
        self.settings = settings or Settings()
        self.project_dir = Path(project_dir).resolve()
        self.config: Config = load_config(self.project_dir, config_path)
        self.state_dir = (self.settings.state_dir or self.project_dir / ".dockyard").resolve()
        self._owner = owner
        self._vars = dict(vars) if vars is not None else None
        self._secrets = dict(secrets) if secrets is not None else None
        objects = self.settings.objects
        self.host = ObjectHost(
            self.state_dir,
            app=self.config.name,
            idle_timeout=objects.idle_timeout,
            open_files=OpenFiles(objects.max_open_files),
            migrations=_class_migrations(
                self.config, self.state_dir / "objects", objects.apply_deletions
            ),
        )
        # KV, D1, static assets and cron triggers (dockyard.bindings).
        self.bindings = Bindings(self.config, self.state_dir)
        self.env = self._make_env()
        self.host.set_env(self.env)
        self.worker: Worker | None = None
        self._lock: IO[str] | None = None
        self._started = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.containers: ContainerManager | None = None
        self.metrics = AppMetrics(self.config.name)
        self.sink: LogSink = _Both(self.metrics, sink) if sink is not None else self.metrics
        self.host.alarms.app = self.config.name
        self.host.alarms.sink = self.sink
        if self.config.containers:
            if runtime is None:
                from .containers.docker import DockerRuntime

                runtime = DockerRuntime(request_timeout=self.settings.containers.engine_timeout)
            self.containers = ContainerManager(
                runtime,
                self.config,
                self.settings.containers,
                owner=self.owner,
                images=image_overrides,
            )
            self.containers.set_waker(self._wake)
            self.containers.sink = self.sink
            self.containers.on_container_request = self.metrics.container_request
            for container in self.config.containers:
                self.host.set_context_extension(
                    container.class_name, self._supervisor_factory(container.class_name)
                )
        containers = self.containers
        self.metrics.watch(
            containers=lambda: (
                [(s.class_name, s.phase.value) for s in containers.supervisors()]
                if containers is not None
                else []
            ),
            objects=lambda: self.host.statistics().live,
            storage=self.state_dir,
        )

    def observe(self, sink: LogSink) -> None:
        """Send the platform events to ``sink`` too (what the constructor's ``sink`` does,
        for a caller that needs the app, its state folder or its engine, to make one)."""
        self.sink = _Both(self.metrics, sink)
        self.host.alarms.sink = self.sink
        if self.containers is not None:
            self.containers.sink = self.sink

    def _make_env(self) -> Env:
        return Env(
            bindings={
                **{
                    binding.name: self.host.namespace(binding.class_name)
                    for binding in self.config.durable_objects.bindings
                },
                **self.bindings.env,
            },
            vars=self.config.vars if self._vars is None else self._vars,
            secrets=self.config.secrets if self._secrets is None else self._secrets,
        )

    @property
    def owner(self) -> str:
        """Who owns this app's containers on the engine (see ``labels.dev_owner``): two
        projects with the same app name never adopt or remove each other's containers."""
        return self._owner or labels.dev_owner(self.state_dir)

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._lock_state_dir()
        self._started = True
        self._load_worker()
        await self.host.start()
        await self.bindings.start(self._scheduled)
        if self.containers is not None:
            # Builds images, then re-adopts containers a previous run left running.
            await self.containers.start()

    async def stop(self, *, leave_containers: bool = False) -> None:
        """End everything the app started. With ``leave_containers`` (a node's app process
        handing over to the next), containers keep running for the next one to adopt."""
        if not self._started:
            return  # start() never got the state folder: nothing here is ours to stop
        self._started = False
        if self._tasks:
            _, pending = await asyncio.wait(
                set(self._tasks), timeout=self.settings.objects.wait_until_grace
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.containers is not None:
            # Containers first, while their objects are alive to record how they ended.
            await self.containers.stop(leave_running=leave_containers)
            await self.containers.runtime.aclose()
        # After wait_until work (it may still use KV or D1), before the objects go.
        await self.bindings.stop()
        await self.host.stop()
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def _lock_state_dir(self) -> None:
        """One platform per state folder: a second would adopt the first's containers."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock (Windows)
            return
        # The state folder holds object storage, secrets in .dev.vars' values, KV and D1:
        # only its owner may read it.
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)
        lock = open(self.state_dir / "dev.lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise DockyardError(
                f"{self.state_dir} is in use by dockyard dev ({holder}); stop that one first, "
                "or serve this project from one process only"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _supervisor_factory(self, class_name: str) -> Callable[[Any], ContainerSupervisor]:
        manager = self.containers
        assert manager is not None

        def make(state: Any) -> ContainerSupervisor:
            return manager.supervisor(class_name, str(state.id), getattr(state.id, "name", None))

        return make

    async def _wake(self, class_name: str, object_id: str) -> None:
        namespace = self.host.namespace(class_name)
        await namespace.get(namespace.id_from_string(object_id)).get_state()

    async def handle(self, request: Request) -> Response:
        assert self.worker is not None, "App.start() was not called"
        headers = request.headers
        if SWITCH_PORT_HEADER in headers or CF_SWITCH_PORT_HEADER in headers:
            # Only the worker chooses a container port (switch_port); a client cannot.
            headers.popall(SWITCH_PORT_HEADER, None)
            headers.popall(CF_SWITCH_PORT_HEADER, None)
        began = time.perf_counter()
        if self.settings.test_scheduled and request.path in SCHEDULED_PATHS:
            return await self._test_scheduled(request)
        try:
            response = await self.bindings.serve(request, self._run_worker)
        except DockyardError as exc:
            ident = error_id()
            log.warning(
                "%s %s -> %s (error id %s): %s", request.method, request.url, exc.status, ident, exc
            )
            response = error_response(exc, ident, debug=self.settings.containers.debug_errors)
        except Exception:
            self.metrics.request(500, time.perf_counter() - began)  # the gateway answers 500
            raise
        self.metrics.request(response.status, time.perf_counter() - began)
        return response

    async def _run_worker(self, request: Request) -> Response:
        assert self.worker is not None, "App.start() was not called"
        return await self.worker.fetch(request, self.env, ExecutionContext(self._tasks))

    async def _test_scheduled(self, request: Request) -> Response:
        """`--test-scheduled`: run the scheduled handler now, as if ``cron`` fired (the
        query's ``cron``, default the config's first; ``time``: scheduledTime in ms)."""
        query = request.query
        cron = query.get("cron") or next(iter(self.bindings.crons), "* * * * *")
        try:
            scheduled_time = float(query.get("time") or time.time() * 1000)
        except ValueError:
            return Response("time must be milliseconds since the epoch\n", status=400)
        worker = self.worker
        if worker is None or not worker.has_scheduled:
            return Response("the worker has no scheduled handler\n", status=404)
        try:
            await self._scheduled(ScheduledController(cron, scheduled_time))
        except Exception:
            ident = error_id()
            log.exception("scheduled handler failed for cron %r (error id %s)", cron, ident)
            return Response(f"the scheduled handler raised (error id {ident})\n", status=500)
        return Response("Ran scheduled event\n")

    async def _scheduled(self, controller: ScheduledController) -> None:
        """A cron trigger fired: run the worker's scheduled handler, if it has one."""
        worker = self.worker
        if worker is None or not worker.has_scheduled:
            log.warning("cron %r fired; the worker has no scheduled handler", controller.cron)
            return
        await worker.scheduled(controller, self.env, ExecutionContext(self._tasks))

    def reload(self) -> bool:
        """Re-import the worker; on failure keep serving the previous one."""
        try:
            self._load_worker()
        except WorkerError as exc:
            log.error("Reload failed, still serving the previous worker: %s", exc)
            return False
        return True

    async def reload_version(
        self,
        project_dir: Path | str,
        *,
        image_overrides: Mapping[str, str],
        vars: Mapping[str, Any],
        secrets: Mapping[str, str],
    ) -> bool:
        """Switch this running app to another deployed version, in place: new worker
        code, images for the next starts, vars and secrets. Objects restart on the new code
        at their next request once their calls in flight finish (as after a dev reload);
        running containers stay until a rollout replaces them.

        False (and nothing changed) when the new version differs in shape (bindings,
        container classes, assets, cron triggers): that needs a new process.
        """
        # A rare control call: reading the new version's config blocks briefly, as a dev
        # reload's import does.
        new_dir = Path(project_dir).resolve()  # noqa: ASYNC240
        config = load_config(new_dir)
        if _shape(config) != _shape(self.config):
            return False
        previous = (self.project_dir, self.config, self._vars, self._secrets)
        self.project_dir, self.config = new_dir, config
        self._vars, self._secrets = dict(vars), dict(secrets)
        try:
            _forget_modules(previous[0])
            self._load_worker()
        except WorkerError:
            # The previous worker keeps serving, with its own config, vars and secrets.
            self.project_dir, self.config, self._vars, self._secrets = previous
            raise
        self.env = self._make_env()
        self.host.set_env(self.env)
        if self.containers is not None:
            for container in config.containers:
                self.containers.classes[container.class_name].config = container
            await self.containers.set_images(image_overrides)
        return True

    def instances(self) -> list[dict[str, Any]]:
        """Every object's container this process supervises, for the node (rollouts,
        listings)."""
        if self.containers is None:
            return []
        return [
            {
                "class_name": s.class_name,
                "object_id": s.object_id,
                "name": s.object_name,
                "phase": s.phase.value,
                "container_id": s.info.id if s.info is not None else None,
                "image": s.info.image if s.info is not None else None,
                "idle_seconds": s.idle_seconds(),
                "inflight": s.inflight,
                "starting": s.starting,
            }
            for s in self.containers.supervisors()
        ]

    async def stop_container(self, container_id: str, *, destroy: bool) -> bool:
        """An operator's stop (API, dashboard): SIGTERM then SIGKILL after the grace
        period, or at once with ``destroy``; recorded as a stop, not an exit. False when
        no object here runs that container."""
        if self.containers is None:
            return False
        for supervisor in self.containers.supervisors():
            if supervisor.info is not None and supervisor.info.id == container_id:
                if destroy:
                    await supervisor.destroy(reason="destroy")
                else:
                    await supervisor.stop(
                        15, reason="stop", grace=self.settings.containers.stop_grace
                    )
                return True
        return False

    async def replace(self, class_name: str, object_id: str) -> bool:
        """A rollout step: restart this object's container on its class's current image
        (see ``ContainerSupervisor.replace``). False when it had no container running."""
        if self.containers is None:
            return False
        for supervisor in self.containers.supervisors():
            if supervisor.class_name == class_name and supervisor.object_id == object_id:
                return await supervisor.replace(grace=self.settings.containers.stop_grace)
        return False

    def _load_worker(self) -> None:
        worker = load_worker(self.config.main_path, self.project_dir, self.state_dir)
        for binding in self.config.durable_objects.bindings:
            cls = worker.get_class(binding.class_name)
            if cls is None:
                raise WorkerError(
                    f"{self.config.main_path.name}: durable_objects binding {binding.name!r} "
                    f"needs class {binding.class_name!r}, which the worker does not define"
                )
            self.host.set_class(binding.class_name, cls)
        self.worker = worker


def _class_migrations(config: Config, objects_dir: Path, apply_deletions: bool) -> ClassMigrations:
    """The config's migrations, for the object host to apply at start."""
    steps = [
        MigrationStep(
            tag=m.tag,
            index=i,
            new_classes=(*m.new_sqlite_classes, *m.new_classes),
            renamed=tuple((r.from_, r.to) for r in m.renamed_classes),
            deleted=tuple(m.deleted_classes),
            transferred=tuple((t.from_script, t.from_, t.to) for t in m.transferred_classes),
        )
        for i, m in enumerate(config.migrations)
    ]
    return ClassMigrations(
        objects_dir,
        steps,
        bound={b.class_name for b in config.durable_objects.bindings if b.script_name is None},
        defined=main_names(config),
        apply_deletions=apply_deletions,
        error_at=lambda path, message: config_error(config, path, message),
        deletion_hint="run dockyard dev with --apply-deletions",
    )


def _shape(config: Config) -> tuple[Any, ...]:
    """What a running app process is built around; a version that changes it needs a new
    process (see ``App.reload_version``)."""
    return (
        config.name,
        tuple((b.name, b.class_name) for b in config.durable_objects.bindings),
        tuple(c.class_name for c in config.containers),
        # Static assets are served from the version's own folder: a new process.
        str(config.config_path.parent) if config.assets is not None else None,
        repr(getattr(config, "kv_namespaces", None)),
        repr(getattr(config, "d1_databases", None)),
        repr(getattr(config, "triggers", None)),
        # Migrations are applied when a process starts (before any object opens).
        tuple(m.tag for m in config.migrations),
    )


def _forget_modules(project_dir: Path) -> None:
    """Drop the modules a previous version imported from its own folder, and the folder
    from the import path, so the next version's modules of the same names load fresh."""
    import sys

    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(project_dir):
            del sys.modules[name]
    for entry in list(sys.path):
        if entry and Path(entry).resolve().is_relative_to(project_dir):
            sys.path.remove(entry)


class _Both:
    """Platform events to the metrics and to the given sink."""

    def __init__(self, metrics: AppMetrics, sink: LogSink) -> None:
        self.metrics = metrics
        self.sink = sink

    def emit(self, record: LogRecord) -> None:
        self.metrics.emit(record)
        self.sink.emit(record)
