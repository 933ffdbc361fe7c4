"""The node commands: `login`, `deploy`, `rollback`, `versions`, `rollouts`, `secret`,
`apps`, `images`, `token` (registered on the `dockyard` tree by `register`).

Server and token: `--server`, else DOCKYARD_SERVER, else the credentials `login` stored;
DOCKYARD_TOKEN, else those credentials (see node/client.py). The deploy's steps are in
deploy.py; the shared plumbing and the remote `containers` commands in remote.py.

Over 400 lines: each node command is a short function over NodeClient and the same
option types and printers; they are one group of the CLI tree.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import load_config
from ..errors import DockyardError
from ..node.client import (
    Credentials,
    NodeClient,
    credentials_path,
    load_credentials,
    normalize_server,
    save_credentials,
)
from .deploy import ROLLOUTS, follow_rollout, print_result, run_deploy
from .remote import (
    client_for,
    details,
    err,
    markup_safe,
    out,
    plain,
    print_json,
    remote_client,
    remote_containers_exec,
    remote_containers_info,
    remote_containers_list,
    remote_containers_logs,
    remote_containers_stop,
    run_async,
    table,
)

__all__ = [
    "register",
    "remote_client",
    "remote_containers_exec",
    "remote_containers_info",
    "remote_containers_list",
    "remote_containers_logs",
    "remote_containers_stop",
]

ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server", help="Node admin URL (default: DOCKYARD_SERVER, else `dockyard login`)."
    ),
]
AppOption = Annotated[
    str | None,
    typer.Option("--app", "-a", help="App name (default: the name in ./wrangler config)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def register(app: typer.Typer) -> None:
    """Add the platform commands to the `dockyard` command tree."""
    app.command()(login)
    app.command()(deploy)
    app.command()(rollback)
    for name, group in _GROUPS.items():
        app.add_typer(group, name=name)


def _exit(code: int) -> None:
    if code:
        raise typer.Exit(code)


def _app_name(app: str | None) -> str:
    return app if app else load_config(Path(".")).name


def _check_rollout(value: str) -> None:
    if value not in ROLLOUTS:
        raise typer.BadParameter(
            f"expected one of {', '.join(ROLLOUTS)}", param_hint="--containers-rollout"
        )


def _read_secret(prompt: str) -> str:
    """From a prompt on a terminal, else all of stdin (one trailing newline dropped)."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    value = sys.stdin.read()
    return value[:-1] if value.endswith("\n") else value


# -- login ----------------------------------------------------------------------------------


def login(url: Annotated[str, typer.Argument(help="The node's admin URL.")]) -> None:
    """Store a node's URL and token (asked for; stdin when piped) for the other commands."""

    async def action() -> int:
        server = normalize_server(url)
        token = _read_secret(f"Token for {server}: ").strip()
        if not token:
            raise DockyardError("no token given")
        async with NodeClient(server, token) as client:
            info = await client.node()
        path = save_credentials(Credentials(server=server, token=token))
        name = info.get("name") or info.get("version") or ""
        err.print(f"[green]Logged in[/] to {markup_safe(server)} {markup_safe(name)}".rstrip())
        err.print(f"Credentials saved in {markup_safe(path)} (mode 0600).")
        return 0

    _exit(run_async(action))


# -- deploy ---------------------------------------------------------------------------------


def deploy(
    directory: Annotated[Path, typer.Argument(help="Project folder.")] = Path("."),
    containers_rollout: Annotated[
        str, typer.Option(help="How running containers move to new images: " + "|".join(ROLLOUTS))
    ] = "gradual",
    message: Annotated[str, typer.Option("--message", "-m", help="Note for this version.")] = "",
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build, push and upload the project as a new version, then follow its rollout."""
    _check_rollout(containers_rollout)

    async def action() -> int:
        # The node loads the bundle's config as it is (wrangler.jsonc, no environment),
        # so the deploy checks exactly that; --config/--env would make the two differ.
        project = load_config(directory)
        for warning in project.warnings:
            err.print(f"[yellow]warning:[/] {markup_safe(warning)}")
        async with client_for(server) as client:
            result = await run_deploy(client, project, rollout=containers_rollout, message=message)
            if as_json:
                print_json(result)
            return await follow_rollout(client, project.name, result.get("rollout"))

    _exit(run_async(action))


# -- versions, rollback, rollouts -----------------------------------------------------------


def rollback(
    version: Annotated[int | None, typer.Argument(help="Version (default: the previous).")] = None,
    containers_rollout: Annotated[
        str, typer.Option(help="How running containers move to its images: " + "|".join(ROLLOUTS))
    ] = "gradual",
    app: AppOption = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make an earlier version active again (worker and images, by the rollout rules)."""
    _check_rollout(containers_rollout)

    async def action() -> int:
        name = _app_name(app)
        async with client_for(server) as client:
            result = await client.rollback(name, version, rollout=containers_rollout)
            if as_json:
                print_json(result)
            else:
                print_result(result)
            return await follow_rollout(client, name, result.get("rollout"))

    _exit(run_async(action))


versions_app = typer.Typer(help="Versions of an app.", no_args_is_help=True)


@versions_app.command("list")
def versions_list(
    app: AppOption = None, server: ServerOption = None, as_json: JsonOption = False
) -> None:
    """Versions of the app, newest first."""

    async def action() -> int:
        name = _app_name(app)
        async with client_for(server) as client:
            versions = await client.list_versions(name)
        if as_json:
            print_json(versions)
            return 0
        rows = [
            [
                f"{v.get('number')}{' *' if v.get('active') else ''}",
                _when(v.get("created_at")),
                str(v.get("bundle_hash", ""))[:12],
                v.get("rollout"),
                v.get("message") or "",
            ]
            for v in versions
        ]
        out.print(table(f"Versions of {name} (* active)", _VERSION_COLUMNS, rows))
        return 0

    _exit(run_async(action))


_VERSION_COLUMNS = ["version", "created", "bundle", "rollout", "message"]

rollouts_app = typer.Typer(help="Container rollouts.", no_args_is_help=True)


@rollouts_app.command("status")
def rollouts_status(
    app: AppOption = None,
    server: ServerOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Watch it to its end.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The app's latest rollout: its step, instances replaced, state."""

    async def action() -> int:
        name = _app_name(app)
        async with client_for(server) as client:
            rollout = await client.rollout(name)
            if follow:
                return await follow_rollout(client, name, rollout)
        if as_json:
            print_json(rollout)
        elif not rollout:
            out.print(f"No rollout for {markup_safe(name)}.")
        else:
            out.print(details(rollout))
        return 0

    _exit(run_async(action))


# -- secrets --------------------------------------------------------------------------------

secret_app = typer.Typer(help="Secrets of an app (encrypted on the node).", no_args_is_help=True)


@secret_app.command("put")
def secret_put(
    name: Annotated[str, typer.Argument(help="Secret name (the value is read, never an arg).")],
    app: AppOption = None,
    server: ServerOption = None,
) -> None:
    """Set a secret from stdin or a prompt; creates a new version."""

    async def action() -> int:
        target = _app_name(app)
        value = _read_secret(f"Value of {name}: ")
        async with client_for(server) as client:
            change = await client.put_secret(target, name, value)
        err.print(f"Secret {markup_safe(name)} set on {markup_safe(target)}.")
        _print_change(change)
        return 0

    _exit(run_async(action))


def _print_change(change: dict[str, Any] | None) -> None:
    """A secret change's new version (none until the app's first deploy)."""
    if isinstance(change, dict) and change.get("version"):
        print_result(change)
    else:
        err.print("It takes effect with the app's next deploy.")


@secret_app.command("list")
def secret_list(
    app: AppOption = None, server: ServerOption = None, as_json: JsonOption = False
) -> None:
    """Names of the app's secrets (never their values)."""

    async def action() -> int:
        target = _app_name(app)
        async with client_for(server) as client:
            names = await client.list_secrets(target)
        if as_json:
            print_json(names)
        else:
            for secret in names:
                out.print(plain(secret))
        return 0

    _exit(run_async(action))


@secret_app.command("delete")
def secret_delete(name: str, app: AppOption = None, server: ServerOption = None) -> None:
    """Remove a secret; creates a new version."""

    async def action() -> int:
        target = _app_name(app)
        async with client_for(server) as client:
            change = await client.delete_secret(target, name)
        err.print(f"Secret {markup_safe(name)} deleted from {markup_safe(target)}.")
        _print_change(change)
        return 0

    _exit(run_async(action))


# -- apps, images, token --------------------------------------------------------------------

apps_app = typer.Typer(help="Apps on the node.", no_args_is_help=True)


@apps_app.command("list")
def apps_list(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Every app on the node and its active version."""

    async def action() -> int:
        async with client_for(server) as client:
            apps = await client.list_apps()
        if as_json:
            print_json(apps)
            return 0
        rows = [[a.get("name"), a.get("active_version"), _when(a.get("created_at"))] for a in apps]
        out.print(table("Apps", ["app", "version", "created"], rows))
        return 0

    _exit(run_async(action))


@apps_app.command("info")
def apps_info(name: str, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """One app: its versions, routes, rollout."""

    async def action() -> int:
        async with client_for(server) as client:
            found = await client.get_app(name)
        if as_json:
            print_json(found)
        else:
            out.print(details(found))
        return 0

    _exit(run_async(action))


@apps_app.command("delete")
def apps_delete(
    name: str,
    server: ServerOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete an app: its process, containers, versions, secrets and state."""
    if not yes and not typer.confirm(f"Delete {name} and all its data?"):
        raise typer.Exit(1)

    async def action() -> int:
        async with client_for(server) as client:
            await client.delete_app(name)
        err.print(f"Deleted {markup_safe(name)}.")
        return 0

    _exit(run_async(action))


images_app = typer.Typer(help="Images in the node's registry.", no_args_is_help=True)


@images_app.command("list")
def images_list(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Images in the node's registry, and which versions use them."""

    async def action() -> int:
        async with client_for(server) as client:
            images = await client.list_images()
        if as_json:
            print_json(images)
            return 0
        rows = [
            [
                i.get("repo") or i.get("repository"),
                ", ".join(i.get("tags") or ([i["tag"]] if i.get("tag") else [])),
                str(i.get("digest", ""))[:19],
                _size(i.get("size")),
                "yes" if i.get("referenced", i.get("used")) else "no",
            ]
            for i in images
        ]
        out.print(table("Images", ["repository", "tags", "digest", "size", "in use"], rows))
        return 0

    _exit(run_async(action))


@images_app.command("prune")
def images_prune(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Delete images no version references, and reclaim their space."""

    async def action() -> int:
        async with client_for(server) as client:
            result = await client.prune_images()
        if as_json:
            print_json(result)
        else:
            out.print(details(result) if result else "Nothing to prune.")
        return 0

    _exit(run_async(action))


token_app = typer.Typer(help="The node's admin token.", no_args_is_help=True)


@token_app.command("rotate")
def token_rotate(server: ServerOption = None) -> None:
    """Replace the admin token (the old one stops working); prints the new one once."""

    async def action() -> int:
        async with client_for(server) as client:
            token = await client.rotate_token()
            server_url = client.server
        stored = load_credentials()
        if stored is not None and normalize_server(stored.server) == server_url:
            save_credentials(Credentials(server=server_url, token=token))
            err.print(f"The new token is saved in {markup_safe(credentials_path())}.")
        print(token)
        return 0

    _exit(run_async(action))


_GROUPS = {
    "versions": versions_app,
    "rollouts": rollouts_app,
    "secret": secret_app,
    "apps": apps_app,
    "images": images_app,
    "token": token_app,
}


def _when(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-" if value is None else str(value)
    from datetime import datetime

    return datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")


def _size(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value / 1024 / 1024:.1f} MiB"
