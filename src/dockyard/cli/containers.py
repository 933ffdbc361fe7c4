"""``dockyard containers ...``: what the dev app runs, read from the engine by label; with
``--server`` (or ``DOCKYARD_SERVER``), what a node runs for an app, through its API."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..config import load_config
from ..containers import labels as label
from ..containers.docker import DockerRuntime
from ..containers.runtime import ContainerInfo
from ..errors import ContainerError

app = typer.Typer(
    help="List and operate the containers of a running `dockyard dev`, or of an app on a node "
    "(--server)."
)
console = Console()
T = TypeVar("T")

ProjectOption = Annotated[
    Path, typer.Option("--project", "-p", help="Project folder with the wrangler config.")
]
ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server", help="A node's admin URL (or DOCKYARD_SERVER): its containers, not dev's."
    ),
]
AppOption = Annotated[
    str | None,
    typer.Option("--app", "-a", help="App on the node (default: the project's name)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _remote(server: str | None) -> Any:
    """The node's client when one is named by --server or DOCKYARD_SERVER, else None."""
    import os

    if server is None and not os.environ.get("DOCKYARD_SERVER"):
        return None
    from .remote import remote_client

    return remote_client(server)


def _remote_app(app_name: str | None, project: Path) -> str:
    return app_name or _app_name(project)


def _app_name(project: Path) -> str:
    return load_config(project).name


def _selector(project: Path) -> dict[str, str]:
    """The labels of this project's containers (its app, run from its state folder)."""
    owner = label.dev_owner(project.resolve() / ".dockyard")
    return {label.APP: _app_name(project), label.OWNER: owner}


def _safe(value: object) -> Text:
    """User data (object names, labels, output) shown without its control characters, so
    a name cannot move the cursor or rewrite the terminal, and without rich markup."""
    return Text(escape_controls(str(value)))


def escape_controls(text: str) -> str:
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _run(project: Path, action: Callable[[DockerRuntime, dict[str, str]], Awaitable[T]]) -> T:
    from . import _run as run_cli

    async def go() -> T:
        async with DockerRuntime() as runtime:
            return await action(runtime, _selector(project))

    result: list[T] = []

    def call() -> int:
        result.append(asyncio.run(go()))
        return 0

    code = run_cli(call)
    if code:
        raise typer.Exit(code)
    return result[0]


async def _find(runtime: DockerRuntime, selector: dict[str, str], ref: str) -> ContainerInfo:
    """A container of this app by container id prefix, object id prefix or object name."""
    app_name = selector[label.APP]
    infos = await runtime.list(selector)
    matches = [
        i
        for i in infos
        if i.id.startswith(ref)
        or i.labels.get(label.OBJECT, "").startswith(ref)
        or i.labels.get(label.NAME) == ref
        or i.name == ref
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ContainerError(
            f"no container of app {app_name!r} matches {escape_controls(repr(ref))} "
            "(give a container id, an object id prefix or an object name; see "
            "`dockyard containers list`)"
        )
    raise ContainerError(
        f"{escape_controls(repr(ref))} matches {len(matches)} containers; give a longer prefix"
    )


def _age(when: datetime | None) -> str:
    if when is None:
        return "-"
    seconds = int((datetime.now(UTC) - when).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


@app.command("list")
def list_(
    project: ProjectOption = Path("."),
    server: ServerOption = None,
    app_name: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Containers of the app, with their object, state and ports."""
    if (client := _remote(server)) is not None:
        from .remote import remote_containers_list

        raise typer.Exit(
            remote_containers_list(client, _remote_app(app_name, project), as_json=as_json)
        )

    async def action(runtime: DockerRuntime, selector: dict[str, str]) -> list[ContainerInfo]:
        return await runtime.list(selector)

    infos = _run(project, action)
    table = Table(title=f"Containers of {_app_name(project)}")
    for column in ("container", "class", "object", "state", "up", "ports", "version"):
        table.add_column(column)
    for info in infos:
        labels = info.labels
        table.add_row(
            info.id[:12],
            _safe(labels.get(label.CLASS, "?")),
            _safe(labels.get(label.NAME) or labels.get(label.OBJECT, "?")[:16]),
            info.status if info.running else f"{info.status} ({info.exit_code})",
            _age(info.started_at) if info.running else "-",
            ", ".join(f"{p}→127.0.0.1:{h}" for p, h in sorted(info.host_ports.items())),
            _safe(labels.get(label.VERSION, "?")),
        )
    console.print(table)


@app.command()
def info(
    ref: str,
    project: ProjectOption = Path("."),
    server: ServerOption = None,
    app_name: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Details of one container."""
    if (client := _remote(server)) is not None:
        from .remote import remote_containers_info

        raise typer.Exit(
            remote_containers_info(client, _remote_app(app_name, project), ref, as_json=as_json)
        )

    async def action(runtime: DockerRuntime, selector: dict[str, str]) -> ContainerInfo:
        return await _find(runtime, selector, ref)

    found = _run(project, action)
    table = Table(show_header=False)
    rows: dict[str, Any] = {
        "id": found.id,
        "name": found.name,
        "image": found.image,
        "state": found.status,
        "exit code": found.exit_code,
        "oom killed": found.oom_killed,
        "started": found.started_at,
        "ports": ", ".join(f"{p}→127.0.0.1:{h}" for p, h in sorted(found.host_ports.items())),
        **{k: v for k, v in sorted(found.labels.items()) if k.startswith("dockyard.")},
    }
    for key, value in rows.items():
        table.add_row(key, _safe("-" if value is None else value))
    console.print(table)


@app.command()
def logs(
    ref: str,
    project: ProjectOption = Path("."),
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
    server: ServerOption = None,
    app_name: AppOption = None,
) -> None:
    """Print a container's output (stdout and stderr)."""
    if (client := _remote(server)) is not None:
        from .remote import remote_containers_logs

        raise typer.Exit(
            remote_containers_logs(
                client, _remote_app(app_name, project), ref, follow=follow, tail=tail
            )
        )

    tty = sys.stdout.isatty()

    async def action(runtime: DockerRuntime, selector: dict[str, str]) -> None:
        found = await _find(runtime, selector, ref)
        async for line in runtime.logs(found.id, follow=follow, tail=tail):
            # Piped output stays byte-exact; a terminal never receives control sequences.
            print(escape_controls(line) if tty else line, flush=True)

    _run(project, action)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec(
    ref: str,
    command: Annotated[list[str], typer.Argument(help="Command and arguments (after --).")],
    project: ProjectOption = Path("."),
    server: ServerOption = None,
    app_name: AppOption = None,
) -> None:
    """Run a command in a running container and print its output."""
    if (client := _remote(server)) is not None:
        from .remote import remote_containers_exec

        raise typer.Exit(
            remote_containers_exec(client, _remote_app(app_name, project), ref, command)
        )

    async def action(runtime: DockerRuntime, selector: dict[str, str]) -> int:
        found = await _find(runtime, selector, ref)
        result = await runtime.exec(found.id, command)
        sys.stdout.buffer.write(result.stdout)
        sys.stderr.buffer.write(result.stderr)
        return result.exit_code

    raise typer.Exit(_run(project, action))


@app.command()
def stop(
    ref: str,
    project: ProjectOption = Path("."),
    grace: Annotated[float, typer.Option(help="Seconds before SIGKILL.")] = 10.0,
    server: ServerOption = None,
    app_name: AppOption = None,
) -> None:
    """Stop a container (SIGTERM, then SIGKILL after the grace period)."""
    if (client := _remote(server)) is not None:
        from .remote import remote_containers_stop

        raise typer.Exit(remote_containers_stop(client, _remote_app(app_name, project), ref))

    async def action(runtime: DockerRuntime, selector: dict[str, str]) -> str:
        found = await _find(runtime, selector, ref)
        await runtime.stop(found.id, grace)
        return found.id

    console.print(f"stopped {_run(project, action)[:12]}")
