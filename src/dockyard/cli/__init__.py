"""The ``dockyard`` command tree."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import DockyardError

__all__ = ["app", "main"]

app = typer.Typer(
    name="dockyard",
    help="Containers on demand behind Python Workers and Durable Objects.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


@app.command()
def dev(
    directory: Annotated[
        Path, typer.Argument(help="Project folder with a wrangler config.")
    ] = Path("."),
    port: Annotated[
        int | None, typer.Option(help="Port to serve on (default: dev.port or 8787).")
    ] = None,
    ip: Annotated[
        str | None, typer.Option(help="Address to bind (default: dev.ip or 127.0.0.1).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Config file to use.")
    ] = None,
    object_idle_timeout: Annotated[
        float, typer.Option(help="Seconds before an idle Durable Object leaves memory.")
    ] = 70.0,
    access_log: Annotated[
        bool, typer.Option(help="Print a line per request (method, path, status, time).")
    ] = True,
    debug_errors: Annotated[
        bool,
        typer.Option(
            help="Show error details (start failures, container output) to HTTP clients; "
            "by default they get a short message and an error id, the console the rest."
        ),
    ] = False,
    env: Annotated[
        str | None,
        typer.Option(
            "--env",
            "-e",
            help="Use the config's env.<NAME> section (as wrangler; also CLOUDFLARE_ENV).",
        ),
    ] = None,
    dashboard: Annotated[
        str,
        typer.Option(
            help="HOST:PORT of the dashboard and /metrics (a login token is printed at "
            "start), or 'off'."
        ),
    ] = "127.0.0.1:8789",
    apply_deletions: Annotated[
        bool,
        typer.Option(
            "--apply-deletions",
            help="Confirm the config's deleted_classes migrations: remove those classes' "
            "stored objects (without it, dev refuses to start).",
        ),
    ] = False,
    test_scheduled: Annotated[
        bool,
        typer.Option(
            "--test-scheduled",
            help="Answer GET /__scheduled?cron=EXPR by running the worker's scheduled "
            "handler at once (as wrangler dev --test-scheduled does).",
        ),
    ] = False,
) -> None:
    """Serve the project's worker locally, reloading it when a .py file changes."""
    from .dev import run_dev
    from .serve import parse_address

    if env is not None:
        # The config loader reads CLOUDFLARE_ENV, as wrangler does; the flag sets it.
        os.environ["CLOUDFLARE_ENV"] = env
    config_path = config.resolve() if config is not None else None
    raise typer.Exit(
        _run(
            lambda: run_dev(
                directory,
                port=port,
                ip=ip,
                config_path=config_path,
                object_idle_timeout=object_idle_timeout,
                access_log=access_log,
                debug_errors=debug_errors,
                dashboard=None if dashboard == "off" else parse_address(dashboard, "--dashboard"),
                apply_deletions=apply_deletions,
                test_scheduled=test_scheduled,
            )
        )
    )


@app.command()
def serve(
    data: Annotated[
        Path | None,
        typer.Option(
            help="Data folder (default /var/lib/dockyard as root, else ~/.local/share/dockyard)."
        ),
    ] = None,
    listen: Annotated[
        str, typer.Option(help="HOST:PORT for application traffic, routed by Host.")
    ] = "127.0.0.1:8787",
    admin: Annotated[
        str, typer.Option(help="HOST:PORT for the control plane, registry and dashboard.")
    ] = "127.0.0.1:8788",
    domain: Annotated[str, typer.Option(help="Apps answer at <name>.<domain>.")] = "localhost",
    tls_cert: Annotated[
        Path | None, typer.Option(help="Certificate (PEM) for the application listener.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
    admin_tls_cert: Annotated[
        Path | None, typer.Option(help="Certificate (PEM) for the admin listener.")
    ] = None,
    admin_tls_key: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
    log_retention: Annotated[
        str, typer.Option(help="How long logs are kept (a duration: 7d, 36h).")
    ] = "7d",
    log_max_size: Annotated[
        int, typer.Option(help="Most MiB the log store may use; the oldest lines go first.")
    ] = 1024,
) -> None:
    """Run a node that serves deployed apps (see `dockyard deploy`) until SIGTERM."""
    from ..durations import parse_span
    from ..node.paths import default_data_dir
    from ..settings import NodeSettings
    from .serve import parse_address, run_serve

    def start() -> int:
        if (tls_cert is None) != (tls_key is None) or (admin_tls_cert is None) != (
            admin_tls_key is None
        ):
            raise DockyardError("--tls-cert and --tls-key go together (and the admin pair too)")
        settings = NodeSettings(
            data_dir=(data or default_data_dir()).resolve(),
            listen=parse_address(listen, "--listen"),
            admin=parse_address(admin, "--admin"),
            domain=domain.lower().strip("."),
            tls_cert=tls_cert,
            tls_key=tls_key,
            admin_tls_cert=admin_tls_cert,
            admin_tls_key=admin_tls_key,
            log_retention=parse_span(log_retention, where="--log-retention"),
            log_max_bytes=log_max_size * 1024 * 1024,
        )
        return run_serve(settings)

    raise typer.Exit(_run(start))


def _run(action: Callable[[], int]) -> int:
    """The CLI's one error handler: a DockyardError becomes a message and an exit code."""
    try:
        return action()
    except DockyardError as exc:
        # The message is text (build output, a node's answer), never rich markup.
        message = escape(str(exc))
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        return exc.exit_code


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


def _register_subcommands() -> None:
    from .containers import app as containers_app
    from .d1 import app as d1_app

    app.add_typer(containers_app, name="containers")
    app.add_typer(d1_app, name="d1")
    try:
        from .platform import register
    except ImportError:  # the deploy commands are being written (cli/platform.py)
        return
    register(app)
    from .observe import register as register_observe

    register_observe(app)


_register_subcommands()
