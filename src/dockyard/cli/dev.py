"""``dockyard dev``: serve one project on this machine until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from pathlib import Path

from aiohttp import web
from rich.console import Console
from rich.logging import RichHandler

from .._limits import raise_open_file_limit, settle_heap
from ..app import App
from ..gateway.server import AccessLog, Gateway
from ..observe.local import LocalObservation
from ..settings import ContainerSettings, ObjectSettings, Settings
from ..watchdog import LoopWatchdog

console = Console(stderr=True)
log = logging.getLogger("dockyard.dev")

# The dashboard's login token, kept on its application.
_TOKEN = web.AppKey("token", str)
# Reload quickly after an edit, but let an editor's burst of writes settle first.
RELOAD_DEBOUNCE_MS = 150


def configure_logging() -> None:
    # (The line per request bypasses logging, and rich: see gateway/access.py.)
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def run_dev(
    directory: Path,
    *,
    port: int | None,
    ip: str | None,
    config_path: Path | None,
    object_idle_timeout: float = 70.0,
    access_log: bool = True,
    debug_errors: bool = False,
    dashboard: tuple[str, int] | None = None,
    apply_deletions: bool = False,
    test_scheduled: bool = False,
) -> int:
    configure_logging()
    settings = Settings(
        objects=ObjectSettings(idle_timeout=object_idle_timeout, apply_deletions=apply_deletions),
        containers=ContainerSettings(debug_errors=debug_errors),
        test_scheduled=test_scheduled,
    )
    app = App(directory, config_path=config_path, settings=settings)
    serve = _serve(app, port=port, ip=ip, dashboard=dashboard, access_log=access_log)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(serve)
    return uvloop.run(serve)


async def _serve(
    app: App,
    *,
    port: int | None,
    ip: str | None,
    dashboard: tuple[str, int] | None = None,
    access_log: bool = True,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # Reports a worker that blocks the loop, and ends the process if a stop signal
    # cannot be handled because of one (see dockyard.watchdog).
    watchdog = LoopWatchdog(loop, source_root=app.project_dir)
    watchdog.watch_signals((signal.SIGINT, signal.SIGTERM))
    watchdog.start()

    for warning in app.config.warnings:
        log.warning("%s", warning)
    # Connections, container connections and object databases each hold a descriptor.
    raise_open_file_limit()
    observation: LocalObservation | None = None
    try:
        await app.start()
        # After start: the state folder is locked, so its log store is this process's.
        observation = LocalObservation(
            app.state_dir,
            app.containers.runtime if app.containers is not None else None,
            app.owner,
        )
        app.observe(observation.sink)
        await observation.start()
        gateway = Gateway(
            app.handle,
            host=ip or app.config.dev.ip,
            port=app.config.dev.port if port is None else port,
            limits=app.settings.gateway,
            access_log=AccessLog() if access_log else None,
        )
        bound = await gateway.start()
        settle_heap()
        panel: web.AppRunner | None = None
        try:
            if dashboard is not None:
                panel = await _open_dashboard(app, observation, dashboard)
            # Watching before "Ready": an edit made as soon as it shows is seen.
            watcher = asyncio.create_task(_watch(app, stop))
            await asyncio.sleep(0)
            console.print(
                f"[bold green]Ready[/] {app.config.name} on http://{gateway.host}:{bound}",
                highlight=False,
            )
            if panel is not None:
                host, port = panel.addresses[0][:2]
                console.print(
                    f"Dashboard on http://{host}:{port}/ui/ (token [bold]{panel.app[_TOKEN]}[/]), "
                    f"metrics on http://{host}:{port}/metrics",
                    highlight=False,
                )
            await stop.wait()
            console.print("Shutting down…")
            await watcher
        finally:
            if panel is not None:
                await panel.cleanup()
            await gateway.stop()
    finally:
        try:
            await app.stop()
        finally:
            try:
                if observation is not None:
                    await observation.aclose()
            finally:
                watchdog.stop()
    return 0


async def _open_dashboard(
    app: App, observation: LocalObservation, address: tuple[str, int]
) -> web.AppRunner | None:
    """The dashboard (``/ui/``) and ``/metrics`` on their own listener; a port in use
    costs the dashboard, not the dev server."""
    # Imported here: Jinja2 and the templates cost dev's start-up ~0.7 s otherwise,
    # also with --dashboard off.
    from ..observe.dashboard import make_dashboard
    from ..observe.local import LocalDashboardSource
    from ..observe.metrics import CONTENT_TYPE

    token = secrets.token_urlsafe(16)
    root = web.Application()
    root[_TOKEN] = token  # printed with the address once dev is ready

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=app.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    root.add_routes([web.get("/metrics", metrics)])
    root.add_subapp("/ui", make_dashboard(LocalDashboardSource(app, observation, token)))
    runner = web.AppRunner(root, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, *address)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        log.warning("No dashboard: %s:%s cannot be used (%s); see --dashboard", *address, exc)
        return None
    return runner


async def _watch(app: App, stop: asyncio.Event) -> None:
    from watchfiles import awatch

    def python_source(_change: object, path: str) -> bool:
        return path.endswith(".py") and "/.dockyard/" not in path and "/.venv/" not in path

    async for changes in awatch(
        app.project_dir,
        watch_filter=python_source,
        stop_event=stop,
        debounce=RELOAD_DEBOUNCE_MS,
        step=50,
    ):
        names = ", ".join(sorted({Path(path).name for _, path in changes}))
        if app.reload():
            settle_heap()
            log.info("Reloaded the worker after a change to %s", names)
