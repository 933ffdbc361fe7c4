"""`dockyard deploy`'s steps, and watching a rollout (deploy and rollback both do).

A deploy is all or nothing: check the config (the same file:line errors as `dev`), pack
the bundle, open a deploy on the node (its lock), build each class's image with the local
engine, push it to the node's registry, upload the bundle, finish. Until the finish the
node has changed nothing: any failure, Ctrl-C included, aborts the deploy, which releases
the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn
from rich.text import Text

from ..config import Config
from ..containers.images import ensure_image
from ..errors import DockyardError
from ..node.bundle import pack
from ..node.client import NodeClient, NodeError
from .containers import escape_controls
from .remote import err, markup_safe

__all__ = ["ROLLOUTS", "follow_rollout", "print_result", "run_deploy"]

ROLLOUTS = ("gradual", "immediate", "none")
# A rollout is watched by asking the node; this is how often (the node does the work).
ROLLOUT_POLL_SECONDS = 0.5
# The registry takes any user name with the token as the password.
REGISTRY_USER = "dockyard"


async def run_deploy(
    client: NodeClient, config: Config, *, rollout: str, message: str
) -> dict[str, Any]:
    """One deploy, all or nothing: the node's answer to the finish, or an error after the
    deploy was aborted (the lock released, nothing changed)."""
    app = config.name
    bundle, bundle_hash = await asyncio.to_thread(pack, config.project_dir, config)
    err.print(f"Bundle: {len(bundle) / 1024:.1f} KiB, sha256 {bundle_hash[:12]}")
    try:
        begun = await client.begin_deploy(app, [c.class_name for c in config.containers])
    except NodeError as exc:
        if exc.status == 409:
            # The node's own text says when the lock ends; keep it, after the plain fact.
            detail = str(exc).replace(f"another deploy of {app} is in progress", "").strip(" ;,")
            raise NodeError(
                f"another deploy of {app} is in progress; try again when it ends"
                + (f" ({detail})" if detail else ""),
                status=409,
                error_id=exc.error_id,
            ) from None
        raise
    deploy_id = str(begun["deploy_id"])
    finishing = False
    try:
        images = await _build_and_push(config, begun, client)
        await client.upload_bundle(app, deploy_id, bundle)
        finishing = True
        result = await client.finish_deploy(
            app, deploy_id, images=images, rollout=rollout, message=message
        )
    except BaseException as exc:
        # Whatever failed (a build, a push, Ctrl-C), the node must forget this deploy.
        with contextlib.suppress(DockyardError):
            await client.abort_deploy(app, deploy_id)
        refused = isinstance(exc, NodeError) and 400 <= exc.status < 500
        if finishing and not refused:
            # The node took the finish but failed in it, or its answer was lost: it may have
            # recorded the version (its active one stays as it was until it starts).
            err.print(
                f"[red]Deploy of {markup_safe(app)} did not complete[/]: see `dockyard versions "
                f"list --app {markup_safe(app)}` for what the node recorded."
            )
        else:
            err.print(f"[red]Deploy of {markup_safe(app)} aborted[/]: the node is unchanged.")
        raise
    print_result(result)
    return result


async def _build_and_push(
    config: Config, begun: Mapping[str, Any], client: NodeClient
) -> dict[str, str]:
    """Each container class's image built (or pulled) locally and pushed to the node's
    registry as <registry>/<repo>:<deploy id>: {class: digest}."""
    if not config.containers:
        return {}
    from ..containers.docker import DockerRuntime

    registry = registry_address(str(begun.get("registry") or ""), client.server)
    repositories: Mapping[str, str] = begun.get("repositories") or {}
    auth = {"username": REGISTRY_USER, "password": client.token, "serveraddress": registry}
    digests: dict[str, str] = {}
    async with DockerRuntime() as runtime:
        for container in config.containers:
            name = container.class_name
            repo = repositories.get(name) or f"{config.name}/{name.lower()}"
            dockerfile = container.dockerfile_path if container.is_dockerfile else None
            if dockerfile is not None:
                err.print(f"[bold]{markup_safe(name)}[/]: building {markup_safe(dockerfile)}")
            # A missing image naming a registry is pulled there as in dev, with the
            # credentials `docker login` stored (containers/pulling.py).
            local = await ensure_image(
                runtime,
                app=config.name,
                class_name=name,
                image=container.image,
                dockerfile=dockerfile,
                context=container.build_context_path,
                build_args=container.image_vars,
                on_output=_build_output(name),
            )
            target = f"{registry}/{repo}:{begun['deploy_id']}"
            await runtime.tag(local, target)
            err.print(f"[bold]{markup_safe(name)}[/]: pushing {markup_safe(target)}")
            try:
                with _PushProgress() as progress:
                    digests[name] = await runtime.push(target, auth, progress.update)
            finally:
                # The per-deploy name only served the push; the image keeps its own.
                with contextlib.suppress(DockyardError):
                    await runtime.untag(target)
            err.print(f"[bold]{markup_safe(name)}[/]: {markup_safe(digests[name])}")
    return digests


def registry_address(advertised: str, server: str) -> str:
    """Where to push: the node's registry address, unless it names no host a deployer can
    reach (a node listening on every address says 0.0.0.0); then the host the API was
    reached at, since one listener serves the API and the registry."""
    if urlsplit(f"//{advertised}").hostname in (None, "", "0.0.0.0", "::"):
        return urlsplit(server).netloc
    return advertised


def _build_output(class_name: str) -> Callable[[str], None]:
    def show(line: str) -> None:
        err.print(Text(f"  {class_name} | {escape_controls(line)}", style="dim"))

    return show


class _PushProgress:
    """A bar per layer from the engine's push events; an existing layer shows as skipped."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            DownloadColumn(),
            console=err,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _PushProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, event: Mapping[str, Any]) -> None:
        layer = event.get("id")
        status = str(event.get("status") or "")
        if not isinstance(layer, str) or not status or len(layer) > 64 or ":" in layer:
            return  # not a layer line (the tag's summary, "The push refers to ...")
        task = self._tasks.get(layer)
        if task is None:
            task = self._tasks[layer] = self._progress.add_task(layer[:12], total=None)
        detail = event.get("progressDetail") or {}
        if status == "Layer already exists":
            self._progress.update(task, description=f"{layer[:12]} skipped (on the node)")
            self._progress.update(task, total=1, completed=1)
        elif status == "Pushed":
            total = self._progress.tasks[self._task_index(task)].total or 1
            self._progress.update(task, description=f"{layer[:12]} pushed")
            self._progress.update(task, total=total, completed=total)
        elif isinstance(detail, dict) and detail.get("total"):
            self._progress.update(
                task,
                description=f"{layer[:12]} {status.lower()}",
                total=detail["total"],
                completed=detail.get("current") or 0,
            )
        else:
            self._progress.update(task, description=f"{layer[:12]} {status.lower()}")

    def _task_index(self, task: TaskID) -> int:
        return next(i for i, t in enumerate(self._progress.tasks) if t.id == task)


def print_result(result: Mapping[str, Any]) -> None:
    version = result.get("version") or {}
    number = version.get("number") if isinstance(version, dict) else version
    err.print(f"[bold green]Version {markup_safe(number)}[/] is live.")
    for change in result.get("changes") or []:
        err.print(f"  • {markup_safe(change)}")


async def follow_rollout(client: NodeClient, app: str, rollout: Any) -> int:
    """Watch a container rollout to its end; non-zero when it failed."""
    if not isinstance(rollout, dict) or rollout.get("state") != "running":
        return rollout_outcome(rollout)
    version = rollout.get("version")
    with Progress(
        TextColumn("Rollout of version {task.fields[version]} {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} instances"),
        console=err,
    ) as progress:
        task = progress.add_task("", total=rollout.get("total") or 0, version=version)
        while True:
            replaced = len(rollout.get("replaced") or [])
            steps = rollout.get("steps") or []
            step = rollout.get("step", 0)
            shown = f"step {step + 1}/{len(steps)} ({steps[step]}%)" if step < len(steps) else ""
            progress.update(task, completed=replaced, description=shown)
            if rollout.get("state") != "running":
                break
            await asyncio.sleep(ROLLOUT_POLL_SECONDS)
            current = await client.rollout(app)
            if not isinstance(current, dict) or current.get("version") != version:
                err.print("The rollout was superseded by a newer version.")
                return 0
            rollout = current
    return rollout_outcome(rollout)


def rollout_outcome(rollout: Any) -> int:
    if not isinstance(rollout, dict):
        return 0
    if rollout.get("state") == "failed":
        error = escape_controls(str(rollout.get("error") or "no reason given"))
        version = markup_safe(rollout.get("version"))
        err.print(f"[bold red]error:[/] the rollout of version {version} failed:")
        err.print(Text(error))
        return 1
    if rollout.get("state") == "done":
        err.print(f"Rollout of version {markup_safe(rollout.get('version'))} done.")
    return 0
