"""`dockyard logs`, `dockyard tail` and `dockyard usage`: what runs on a node, what it
printed and what it cost, from the node's admin API (see node/observe_api.py)."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from ..config import load_config
from ..errors import DockyardError
from .containers import escape_controls
from .platform import JsonOption, ServerOption
from .remote import client_for, out, print_json, run_async, table

__all__ = ["format_record", "register"]

AppArgument = Annotated[
    str | None,
    typer.Argument(help="App name (default: the one in ./wrangler config, else every app)."),
]
ClassOption = Annotated[str | None, typer.Option("--class", help="Only this container class.")]
ObjectOption = Annotated[str | None, typer.Option("--object", help="Only this object id.")]
ContainerOption = Annotated[str | None, typer.Option("--container", help="Only this container.")]
LevelOption = Annotated[
    str | None, typer.Option("--level", help="At least this level: debug, info, warning, error.")
]
GrepOption = Annotated[
    str | None, typer.Option("--grep", help="Only lines containing all these words.")
]
SourceOption = Annotated[
    str | None, typer.Option("--source", help="Only container, worker or platform records.")
]

_LEVEL_STYLE = {"error": "bold red", "warning": "yellow", "debug": "dim"}


def register(app: typer.Typer) -> None:
    app.command("logs")(logs)
    app.command("tail")(tail)
    app.command("usage")(usage)


def _default_app(app: str | None) -> str | None:
    if app:
        return app
    try:
        return load_config(Path(".")).name
    except DockyardError:
        return None  # no project here: every app


def _filters(
    app: str | None,
    class_name: str | None,
    object_id: str | None,
    container: str | None,
    level: str | None,
    grep: str | None,
    source: str | None,
) -> dict[str, str]:
    """The query parameters that choose records (GET /logs and /logs/tail)."""
    return _params(
        app=_default_app(app),
        container=container,
        level=level,
        grep=grep,
        source=source,
        **{"class": class_name, "object": object_id},
    )


def _params(**values: Any) -> dict[str, str]:
    return {key: str(value) for key, value in values.items() if value not in (None, "")}


def logs(
    app: AppArgument = None,
    since: Annotated[
        str, typer.Option(help="From (a duration back from now: 15m, 2h; or ISO 8601).")
    ] = "1h",
    until: Annotated[str | None, typer.Option(help="Until (same forms as --since).")] = None,
    class_name: ClassOption = None,
    object_id: ObjectOption = None,
    container: ContainerOption = None,
    level: LevelOption = None,
    grep: GrepOption = None,
    source: SourceOption = None,
    limit: Annotated[int, typer.Option(help="At most this many (the newest).")] = 1000,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stored logs of an app: what its containers and worker printed, and what the
    platform did (deploys, starts, stops with exit codes, rollouts)."""
    params = _filters(app, class_name, object_id, container, level, grep, source)
    params.update(_params(since=since, until=until, limit=limit))

    async def action() -> int:
        async with client_for(server) as client:
            records = await client.logs(params)
        for record in records:
            _show(record, as_json=as_json)
        return 0

    raise typer.Exit(run_async(action))


def tail(
    app: AppArgument = None,
    class_name: ClassOption = None,
    object_id: ObjectOption = None,
    container: ContainerOption = None,
    level: LevelOption = None,
    grep: GrepOption = None,
    source: SourceOption = None,
    lines: Annotated[
        int, typer.Option("--lines", "-n", help="First show this many stored lines.")
    ] = 20,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Follow an app's logs live (Ctrl-C ends it)."""
    params = _filters(app, class_name, object_id, container, level, grep, source)
    params.update(_params(backlog=lines))

    async def action() -> int:
        async with client_for(server) as client:
            async for record in client.tail(params):
                _show(record, as_json=as_json)
        return 0

    raise typer.Exit(run_async(action))


def usage(
    app: AppArgument = None,
    since: Annotated[
        str, typer.Option(help="From (a duration back from now: 24h, 30d; or ISO 8601).")
    ] = "30d",
    until: Annotated[str | None, typer.Option(help="Until (same forms as --since).")] = None,
    by: Annotated[str, typer.Option(help="Group by app, class, object or day.")] = "class",
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Metered use and its cost at Cloudflare's published prices: memory and disk while
    containers run, active CPU from their cgroups, egress bytes."""
    params = _params(app=_default_app(app), since=since, until=until, by=by)

    async def action() -> int:
        async with client_for(server) as client:
            result = await client.usage(params)
        if as_json:
            print_json(result)
            return 0
        rows = [
            [
                row.get("key"),
                row.get("runs"),
                _seconds(row.get("running_seconds")),
                _seconds(row.get("paused_seconds")),
                f"{float(row.get('vcpu_seconds', 0)):.2f}",
                f"{float(row.get('memory_gib_seconds', 0)):.2f}",
                f"{float(row.get('disk_gb_seconds', 0)):.1f}",
                _bytes(row.get("egress_bytes")),
                f"${float(row.get('cost_usd', 0)):.6f}",
            ]
            for row in result.get("rows", [])
        ]
        title = f"Usage by {result.get('by', by)} since {since}"
        headers = [by, "runs", "running", "paused", "vCPU-s", "GiB-s", "GB-s", "egress", "cost"]
        out.print(table(title, headers, rows))
        out.print(f"Total: ${float(result.get('total_usd', 0)):.6f}")
        return 0

    raise typer.Exit(run_async(action))


def format_record(record: dict[str, Any]) -> Text:
    """One record as a terminal line: time, where it came from, level, message."""
    when = datetime.fromtimestamp(float(record.get("time") or time.time()))
    where = record.get("app", "")
    if record.get("class_name"):
        name = record.get("object_name") or str(record.get("object_id", ""))[:8]
        where += f" {record['class_name']}/{name}" if name else f" {record['class_name']}"
    origin = record.get("event") or f"{record.get('source', '')}:{record.get('stream', '')}"
    level = str(record.get("level", "info"))
    line = Text()
    line.append(when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3], style="dim")
    line.append(f" {escape_controls(where)}", style="cyan")
    line.append(f" {escape_controls(origin)}", style="magenta" if record.get("event") else "dim")
    if level != "info":
        line.append(f" {level.upper()}", style=_LEVEL_STYLE.get(level, ""))
    line.append(" " + escape_controls(str(record.get("message", ""))))
    return line


def _show(record: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        import json

        print(json.dumps(record, sort_keys=True), flush=True)
    else:
        out.print(format_record(record))


def _seconds(value: Any) -> str:
    seconds = float(value or 0)
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _bytes(value: Any) -> str:
    size = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
