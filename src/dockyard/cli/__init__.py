"""The ``dockyard`` command tree."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
) -> None:
    """Serve the project's worker locally, reloading it when a .py file changes."""
    from .dev import run_dev

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
            )
        )
    )


def _run(action: Callable[[], int]) -> int:
    """The CLI's one error handler: a DockyardError becomes a message and an exit code."""
    try:
        return action()
    except DockyardError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
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


_register_subcommands()
