"""What the node commands share (consoles, the async runner, the client, tables), and the
remote side of `dockyard containers` (the lead's containers.py calls `remote_containers_*`
when a node is configured)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..errors import DockyardError
from ..node.client import NodeClient, resolve_credentials
from .containers import escape_controls

__all__ = [
    "client_for",
    "details",
    "err",
    "markup_safe",
    "out",
    "plain",
    "print_json",
    "remote_client",
    "remote_containers_exec",
    "remote_containers_info",
    "remote_containers_list",
    "remote_containers_logs",
    "remote_containers_stop",
    "run_async",
    "table",
]

# Results go to stdout (`--json` for scripts); progress and messages to stderr.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def run_async(action: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    """Run one command's coroutine under the CLI's single error handler; its exit code."""
    from . import _run as run_cli

    return run_cli(lambda: asyncio.run(action()) or 0)


def remote_client(server: str | None = None) -> NodeClient | None:
    """A client for the node named by `--server`, DOCKYARD_SERVER or the credentials file;
    None when none is named (the `containers` commands then act on `dockyard dev`).
    Raises `DockyardError` when a server is named but no token is known for it."""
    credentials = resolve_credentials(server)
    if credentials is None:
        return None
    return NodeClient(credentials.server, credentials.token)


def client_for(server: str | None) -> NodeClient:
    client = remote_client(server)
    if client is None:
        raise DockyardError(
            "no Dockyard node configured: run `dockyard login URL`, or pass --server "
            "(or set DOCKYARD_SERVER) with DOCKYARD_TOKEN"
        )
    return client


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def markup_safe(value: object) -> str:
    """User or node text for a markup string: no control characters, no rich markup."""
    return escape(escape_controls(str(value)))


def plain(value: object) -> Text:
    return Text(escape_controls("-" if value is None else str(value)))


def table(title: str | None, columns: list[str], rows: list[list[object]]) -> Table:
    grid = Table(title=plain(title) if title else None)
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*(plain(cell) for cell in row))
    return grid


def details(value: Mapping[str, Any]) -> Table:
    grid = Table(show_header=False)
    for key, item in value.items():
        shown = json.dumps(item, sort_keys=True) if isinstance(item, dict | list) else item
        grid.add_row(plain(key), plain(shown))
    return grid


# -- remote containers (the `containers` commands with a node) ------------------------------


def _remote(client: NodeClient, action: Callable[[], Awaitable[int]]) -> int:
    async def go() -> int:
        async with client:
            return await action()

    return run_async(go)


async def _find(client: NodeClient, app: str, ref: str) -> dict[str, Any]:
    """A container of the app by container id prefix, object id prefix or object name."""
    found = [c for c in await client.list_containers(app) if ref in _container_keys(c)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise DockyardError(
            f"no container of app {app!r} matches {escape_controls(repr(ref))} (give a "
            "container id, an object id prefix or an object name; see `dockyard containers list`)"
        )
    raise DockyardError(f"{escape_controls(repr(ref))} matches {len(found)} containers")


def _container_keys(c: Mapping[str, Any]) -> set[str]:
    keys: set[str] = set()
    for value in (c.get("id"), c.get("object_id"), _label(c, "dockyard.object_id")):
        if isinstance(value, str):
            keys.update(value[:n] for n in range(1, len(value) + 1))
    for value in (c.get("name"), c.get("object_name"), _label(c, "dockyard.object_name")):
        if isinstance(value, str) and value:
            keys.add(value)
    return keys


def _label(c: Mapping[str, Any], key: str) -> Any:
    labels = c.get("labels")
    return labels.get(key) if isinstance(labels, dict) else None


def remote_containers_list(client: NodeClient, app: str, *, as_json: bool = False) -> int:
    async def action() -> int:
        found = await client.list_containers(app)
        if as_json:
            print_json(found)
            return 0
        rows = [
            [
                str(c.get("id", ""))[:12],
                c.get("class_name") or _label(c, "dockyard.class"),
                c.get("object_name")
                or _label(c, "dockyard.object_name")
                or str(c.get("object_id") or _label(c, "dockyard.object_id") or "")[:16],
                c.get("status") or c.get("state"),
                c.get("image"),
                c.get("version") or _label(c, "dockyard.version"),
            ]
            for c in found
        ]
        columns = ["container", "class", "object", "state", "image", "version"]
        out.print(table(f"Containers of {app}", columns, rows))
        return 0

    return _remote(client, action)


def remote_containers_info(client: NodeClient, app: str, ref: str, *, as_json: bool = False) -> int:
    async def action() -> int:
        found = await client.get_container(str((await _find(client, app, ref))["id"]))
        if as_json:
            print_json(found)
        else:
            out.print(details(found))
        return 0

    return _remote(client, action)


def remote_containers_logs(
    client: NodeClient, app: str, ref: str, *, follow: bool = False, tail: int | None = None
) -> int:
    tty = sys.stdout.isatty()

    async def action() -> int:
        container_id = str((await _find(client, app, ref))["id"])
        async for line in client.container_logs(container_id, tail=tail, follow=follow):
            print(escape_controls(line) if tty else line, flush=True)
        return 0

    return _remote(client, action)


def remote_containers_exec(client: NodeClient, app: str, ref: str, command: list[str]) -> int:
    async def action() -> int:
        container_id = str((await _find(client, app, ref))["id"])
        result = await client.exec(container_id, command)
        for key, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            data = result.get(key) or ""
            stream.write(data if isinstance(data, str) else json.dumps(data))
            stream.flush()
        code = result.get("exit_code", 0)
        return code if isinstance(code, int) else 1

    return _remote(client, action)


def remote_containers_stop(client: NodeClient, app: str, ref: str) -> int:
    async def action() -> int:
        container_id = str((await _find(client, app, ref))["id"])
        await client.stop_container(container_id)
        out.print(f"stopped {markup_safe(container_id[:12])}")
        return 0

    return _remote(client, action)
