"""An app's own process on a node: ``python -m dockyard.node.child``.

It reads its ``Launch`` (appproc.py) as JSON on stdin, loads the app's config and worker,
then listens in ``run_dir/p<pid>/``:

- ``http.sock``: the app's ``Gateway`` (the router splices TLS connections to it);
- ``handoff.sock``: connections the router accepted, handed over with their first bytes;
- ``control.sock``: the node's calls, JSON over HTTP:
  ``GET /health``, ``GET /instances``, ``POST /reload`` (a Launch), ``POST /replace``
  ``{"class", "object_id"}``.

and reports ``{"event": "prepared"}``. Then it takes the state folder (a previous process
of the app may still be finishing its requests: requests wait meanwhile), starts the
app and reports ``{"event": "ready"}``. Reports (those events, and the platform's records
of its containers) go on the pipe the node passed (``Launch.report_fd``), never on stdout:
the worker prints there, and a partial line of its own would swallow a report, a printed
one pass for the process's. Logs go to stderr; the node logs each line.

SIGTERM: stop taking connections, finish requests in flight (``drain_grace``), stop the
objects and leave the containers running for the next process to adopt. SIGINT: the
same, but stop and remove the containers (node shutdown, app deletion).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import io
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from .._limits import raise_open_file_limit, settle_heap
from ..app import App
from ..containers.remote import RemoteRuntime
from ..errors import DockyardError
from ..gateway.handoff import HandoffServer
from ..gateway.server import Gateway
from ..http import Request, Response
from ..observe.records import LogRecord
from ..settings import ObjectSettings, Settings
from ..watchdog import LoopWatchdog
from ..worker import load_worker
from .appproc import Launch, process_dir

log = logging.getLogger("dockyard.node.child")

# Launch.settings names -> (Settings section, field).
SETTINGS: dict[str, tuple[str, str]] = {
    "stop_grace": ("containers", "stop_grace"),
    "debug_errors": ("containers", "debug_errors"),
    "idle_timeout": ("objects", "idle_timeout"),
    "drain_grace": ("gateway", "stop_grace"),
}

# What the node reads of Launch.settings, not the app.
NODE_SETTINGS = {"exit_grace"}


def settings_for(launch: Launch) -> Settings:
    sections: dict[str, Any] = {}
    # A deploy applies its migrations' deleted_classes, as Cloudflare's does: the deploy
    # is the confirmation that dev asks for with --apply-deletions.
    base = Settings(state_dir=Path(launch.state_dir), objects=ObjectSettings(apply_deletions=True))
    for name, value in launch.settings.items():
        if name not in SETTINGS:
            if name not in NODE_SETTINGS:
                log.warning("unknown setting %r ignored", name)
            continue
        section, attr = SETTINGS[name]
        current = sections.get(section, getattr(base, section))
        sections[section] = dataclasses.replace(current, **{attr: value})
    return base.replace(**sections)


class Child:
    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self.dir = process_dir(Path(launch.run_dir), os.getpid())
        self.app: App | None = None
        self.started = asyncio.Event()
        self.stopping = asyncio.Event()
        self.leave_containers = True
        self.reports = _Reports(launch.report_fd)

    def _on_signal(self, leave_containers: bool) -> None:
        # SIGINT wins over SIGTERM: once asked to stop the containers, they are stopped.
        self.leave_containers = self.leave_containers and leave_containers
        self.stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_signal, True)
        loop.add_signal_handler(signal.SIGINT, self._on_signal, False)
        raise_open_file_limit()
        launch = self.launch
        try:
            app = App(
                launch.bundle_dir,
                settings=settings_for(launch),
                runtime=RemoteRuntime(Path(launch.run_dir) / "engine.sock"),
                owner=launch.owner,
                image_overrides=launch.images,
                vars=launch.vars,
                secrets=launch.secrets,
                sink=self.reports,
            )
            # Before a previous process is told to stop: a version whose worker does not
            # import never takes over. (App.start imports it again.)
            load_worker(app.config.main_path, app.project_dir, app.state_dir)
            # Likewise a migration that would be refused (a rename onto stored objects, a
            # class left with no binding): checked read-only, the state is not ours yet.
            if app.host.migrations is not None:
                app.host.migrations.check()
        except (DockyardError, OSError) as exc:
            log.error("%s", exc)
            return 1
        if app.containers is not None:
            app.containers.deploy_version = launch.version
        self.app = app
        watchdog = LoopWatchdog(loop, source_root=app.project_dir)
        watchdog.watch_signals((signal.SIGINT, signal.SIGTERM))
        watchdog.start()
        # Named by this pid: one left over is a dead process's (the pid was reused).
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(mode=0o700)
        gateway = Gateway(self._dispatch, path=self.dir / "http.sock", limits=app.settings.gateway)
        handoff = HandoffServer(gateway, self.dir / "handoff.sock")
        control = web.AppRunner(self._control_app(), access_log=None)
        try:
            await gateway.start()
            await handoff.start()
            await control.setup()
            await web.UnixSite(control, str(self.dir / "control.sock")).start()
            self.reports.event("prepared")
            if not await self._wait_state_lock(app.state_dir):
                return 0
            await app.start()
            settle_heap()
            self.started.set()
            self.reports.event("ready")
            await self.stopping.wait()
            log.info(
                "stopping; containers will be %s",
                "left running" if self.leave_containers else "stopped",
            )
            return 0
        except (DockyardError, OSError) as exc:
            log.error("%s", exc)
            return 1
        finally:
            self.stopping.set()
            await handoff.stop()
            await gateway.stop()
            try:
                await app.stop(leave_containers=self.leave_containers)
            finally:
                await control.cleanup()
                watchdog.stop()

    async def _wait_state_lock(self, state_dir: Path) -> bool:
        """Wait until no other process holds the app's state folder (the one this one
        replaces ends once its requests finish). False when told to stop meanwhile."""
        loop = asyncio.get_running_loop()
        free: asyncio.Future[None] = loop.create_future()

        def wait() -> None:  # a daemon thread: it must not keep a stopping process alive
            try:
                state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                with open(state_dir / "dev.lock", "a+") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    # Released at once: App.start takes it again (flock is per open file).
            except OSError as exc:
                loop.call_soon_threadsafe(_resolve, free, exc)
            else:
                loop.call_soon_threadsafe(_resolve, free, None)

        threading.Thread(target=wait, name="dockyard-state-lock", daemon=True).start()
        stopping = asyncio.ensure_future(self.stopping.wait())
        waits: list[asyncio.Future[Any]] = [free, stopping]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if free.done() and free.exception() is not None:
            raise DockyardError(f"cannot lock the state folder: {free.exception()}")
        return free.done()

    async def _wait_started(self) -> bool:
        if self.started.is_set():
            return True
        waits = [asyncio.ensure_future(e.wait()) for e in (self.started, self.stopping)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return self.started.is_set()

    async def _dispatch(self, request: Request) -> Response:
        if not await self._wait_started():
            return Response("Service Unavailable\n", status=503, headers={"Retry-After": "1"})
        assert self.app is not None
        return await self.app.handle(request)

    # -- control API ----------------------------------------------------------------------

    def _control_app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/health", self._health),
                web.get("/instances", self._started(self._instances)),
                web.post("/reload", self._started(self._reload)),
                web.post("/replace", self._started(self._replace)),
                web.get("/metrics", self._started(self._metrics)),
                web.post("/stop", self._started(self._stop_container)),
            ]
        )
        return app

    def _started(self, handler: Callable[[web.Request, App], Any]) -> Callable[[web.Request], Any]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if not await self._wait_started():
                return web.json_response({"error": "the app is stopping"}, status=503)
            assert self.app is not None
            try:
                response: web.StreamResponse = await handler(request, self.app)
            except DockyardError as exc:
                return web.json_response({"error": str(exc)}, status=422)
            return response

        return wrapped

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "app": self.launch.app,
                "version": self.launch.version,
                "pid": os.getpid(),
                "serving": self.started.is_set() and not self.stopping.is_set(),
            }
        )

    async def _instances(self, request: web.Request, app: App) -> web.Response:
        return web.json_response(app.instances())

    async def _stop_container(self, request: web.Request, app: App) -> web.Response:
        body = await request.json()
        stopped = await app.stop_container(str(body["id"]), destroy=bool(body.get("destroy")))
        return web.json_response({"stopped": stopped})

    async def _metrics(self, request: web.Request, app: App) -> web.Response:
        return web.json_response({"text": app.metrics.render().decode()})

    async def _reload(self, request: web.Request, app: App) -> web.Response:
        try:
            launch = Launch.from_json(await request.read())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": f"bad launch: {exc}"}, status=400)
        if launch.app != self.launch.app:
            return web.json_response({"error": "a launch of another app"}, status=400)
        reloaded = await app.reload_version(
            launch.bundle_dir,
            image_overrides=launch.images,
            vars=launch.vars,
            secrets=launch.secrets,
        )
        if reloaded:
            settle_heap()
            self.launch = launch
            if app.containers is not None:
                app.containers.deploy_version = launch.version
            log.info("reloaded: now version %d", launch.version)
        return web.json_response({"reloaded": reloaded})

    async def _replace(self, request: web.Request, app: App) -> web.Response:
        body = await request.json()
        replaced = await app.replace(str(body["class"]), str(body["object_id"]))
        return web.json_response({"replaced": replaced})


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(None)


class _Reports:
    """This process's reports to the node, one JSON line each: ``{"event": ...}`` and the
    platform's records (``{"log": ...}``, a `LogSink`). On the node's pipe ``fd``; on
    stdout only when started without one (by hand)."""

    def __init__(self, fd: int | None) -> None:
        if fd is None:
            self._out: IO[str] = sys.stdout
        else:
            os.set_inheritable(fd, False)  # never the worker's subprocesses'
            self._out = os.fdopen(fd, "w", encoding="utf-8")

    def event(self, name: str) -> None:
        self._write(json.dumps({"event": name, "pid": os.getpid()}))

    def emit(self, record: LogRecord) -> None:
        self._write('{"log":' + record.to_json() + "}")

    def _write(self, line: str) -> None:
        try:
            self._out.write(line + "\n")
            self._out.flush()
        except (OSError, ValueError):
            pass  # the node is gone (its pipe closed): nobody to report to


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    # The node adds the time and the app's name to each line.
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def main() -> int:
    _configure_logging()
    # What the worker prints reaches the node (and `dockyard tail`) line by line, not when
    # a pipe's buffer fills.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        launch = Launch.from_json(sys.stdin.buffer.read())
    except (ValueError, TypeError) as exc:
        log.error("bad launch on stdin: %s", exc)
        return 2
    child = Child(launch)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(child.run())
    return uvloop.run(child.run())


if __name__ == "__main__":
    sys.exit(main())
