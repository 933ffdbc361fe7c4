"""How a version comes to be: deploys, rollbacks and secret changes, on one node.

A deploy is three calls and an escape hatch (docs/api.md shows them on the wire):

    begin   take the app's deploy lock (a second deploy meanwhile is 409) and a deploy id
    bundle  stream the worker bundle to uploads/<deploy id>.tar.gz (413 past the limit)
    finish  unpack it, load its config (422 with file:line), check that the registry holds
            every container class's image, pull them into the engine, record version N,
            activate it, release the lock
    abort   release the lock and drop the upload

Atomic: nothing the node serves changes before ``add_version``; an unpacked bundle or a
pulled image is inert until a version names it. A finish that fails *before* the version
is recorded leaves the deploy open, so the client may fix what was wrong (push a missing
image) and finish again, or abort; the lock's ttl frees the app if the client went away.
A finish that fails *after* (the new version would not start) ends the deploy: version N
stays recorded but inactive, the old version keeps serving, and the error says so.

Rollback makes a new version that copies the target (Cloudflare's model: history only
grows, and "what is live" is always the newest active record), with the app's current
secret names, activated by the rollout rules. A secret change also makes a new version
(a copy of the active one with the new secret names), activated with strategy "none":
the worker reloads in place and containers pick secrets up at their next start.

Changes of one app (finish, rollback, secret put/delete) are serialised by a per-app
lock, so two of them never both compute "the next version from the active one". A
finish renews the deploy lock when it starts and checks it again just before recording
the version, so an abort that lands while it unpacks or pulls wins: nothing changes.

Over 400 lines: the three flows share the version-making helpers (copy, changes, config
summary) and the protocols they need of the node; split, each would import the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets as random
import shutil
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..config import Config, load_config
from ..containers.runtime import ContainerInfo, ContainerRuntime
from ..errors import ConfigError, DockyardError
from .bundle import BundleExists, unpack
from .paths import NodePaths, validate_app_name
from .registry import ImageEntry
from .secrets import SecretBox
from .store import NodeStore, RolloutRecord, VersionRecord
from .tokens import Tokens

__all__ = [
    "DEPLOY_LOCK_TTL",
    "ActivationFailed",
    "DeployState",
    "Deploys",
    "ImagePuller",
    "InvalidInput",
    "NodeControl",
    "NotFound",
    "RegistryControl",
    "VersionChange",
    "describe_changes",
    "repository",
]

log = logging.getLogger("dockyard.node.deploys")

# NodeSettings.deploy_lock_ttl's default; a node passes its own through `Deploys`.
DEPLOY_LOCK_TTL = 900.0
_DEPLOY_ID = re.compile(r"[0-9a-f]{32}")
SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_CHUNK = 1024 * 1024


# -- errors the API turns into responses ----------------------------------------------------


class NotFound(DockyardError):
    status = 404
    public_message = None


class InvalidInput(DockyardError):
    """A 422: the request is well-formed but its content is refused. `fields` says where."""

    status = 422
    public_message = None

    def __init__(self, message: str, fields: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or []


class DeployState(DockyardError):
    """A 409: the call does not fit the deploy's or app's state (finish before upload,
    roll back an app with no version)."""

    status = 409
    public_message = None


class ActivationFailed(DockyardError):
    """The version was recorded but did not start; the previous one still serves."""

    status = 500
    public_message = None


# -- what the node offers -------------------------------------------------------------------


class RegistryControl(Protocol):
    """The parts of node/registry.py's `Registry` the API uses."""

    @property
    def address(self) -> str: ...

    async def manifest_digest(self, repo: str, reference: str) -> str | None: ...

    async def catalog(self) -> list[ImageEntry]: ...

    async def delete(self, repo: str, digest: str) -> None: ...

    async def garbage_collect(self) -> object: ...


@runtime_checkable
class ImagePuller(Protocol):
    """A runtime that can pull from the node's registry (DockerRuntime.pull)."""

    async def pull(self, ref: str) -> str: ...


class NodeControl(Protocol):
    """What the API needs of the node; `node.Node` implements it."""

    @property
    def paths(self) -> NodePaths: ...
    @property
    def store(self) -> NodeStore: ...
    @property
    def secrets(self) -> SecretBox: ...
    @property
    def tokens(self) -> Tokens: ...
    @property
    def registry(self) -> RegistryControl: ...
    @property
    def runtime(self) -> ContainerRuntime: ...
    @property
    def owner(self) -> str: ...
    @property
    def admin_address(self) -> str: ...
    @property
    def max_upload_bytes(self) -> int: ...

    async def activate(self, app: str, number: int, strategy: str) -> RolloutRecord | None: ...

    async def delete_app(self, app: str) -> None: ...

    async def stop_container(self, info: ContainerInfo) -> None:
        """An operator's stop of one of the node's containers."""
        ...

    def tokens_rotated(self) -> None:
        """Every token was replaced: end what was opened with the old ones."""
        ...

    def run_ref(self, image: str) -> str: ...


def repository(app: str, class_name: str) -> str:
    """The registry repository of an app's container class."""
    return f"{app}/{class_name.lower()}"


class VersionChange:
    """A version that was just recorded and activated, what changed, and its rollout."""

    def __init__(
        self, version: VersionRecord, changes: list[str], rollout: RolloutRecord | None
    ) -> None:
        self.version = version
        self.changes = changes
        self.rollout = rollout


# -- the flows ------------------------------------------------------------------------------


class Deploys:
    def __init__(self, node: NodeControl, *, lock_ttl: float = DEPLOY_LOCK_TTL) -> None:
        self.node = node
        self.lock_ttl = lock_ttl
        self._locks: dict[str, asyncio.Lock] = {}
        # Apps with a deploy begun by this process and not ended: pruning keeps their
        # repositories, whose images may be pushed but not yet named by a version.
        self.open_apps: set[str] = set()

    def _lock(self, app: str) -> asyncio.Lock:
        return self._locks.setdefault(app, asyncio.Lock())

    # deploys

    def begin(self, app: str, classes: Iterable[str] = ()) -> dict[str, Any]:
        validate_app_name(app)
        store = self.node.store
        deploy_id = random.token_hex(16)
        store.begin_deploy(app, deploy_id, self.lock_ttl)
        self.open_apps.add(app)
        opened = store.get_deploy(app, deploy_id)
        known = set(classes)
        record = store.get_app(app)
        if record is not None and record.active_version is not None:
            active = store.get_version(app, record.active_version)
            known.update(active.images if active is not None else ())
        log.info("Deploy %s of %s begun", deploy_id, app)
        return {
            "deploy_id": deploy_id,
            "registry": self.node.admin_address,
            "repositories": {name: repository(app, name) for name in sorted(known)},
            "expires_at": opened["expires_at"] if opened else 0.0,
        }

    def _open_deploy(self, app: str, deploy_id: str) -> dict[str, Any]:
        validate_app_name(app)
        found = (
            self.node.store.get_deploy(app, deploy_id) if _DEPLOY_ID.fullmatch(deploy_id) else None
        )
        if found is None:
            raise NotFound(f"no open deploy {deploy_id!r} of {app} (finished, aborted or expired)")
        return found

    def upload_path(self, deploy_id: str) -> Path:
        return self.node.paths.uploads_dir / f"{deploy_id}.tar.gz"

    async def upload(
        self,
        app: str,
        deploy_id: str,
        chunks: Callable[[], Awaitable[bytes]],
        declared: int | None,
    ) -> dict[str, Any]:
        """Stream the bundle to disk, hashing it; 413 (before reading, when the declared
        length says so) past `max_upload_bytes`. A new upload replaces an earlier one."""
        self._open_deploy(app, deploy_id)
        limit = self.node.max_upload_bytes
        if declared is not None and declared > limit:
            raise UploadTooLarge(limit)
        target = self.upload_path(deploy_id)
        # One file per upload: two uploads to one deploy must not write into each other.
        partial = target.with_name(f"{target.name}.{random.token_hex(4)}.part")
        digest = hashlib.sha256()
        size = 0
        try:
            with partial.open("wb") as file:
                while chunk := await chunks():
                    size += len(chunk)
                    if size > limit:
                        raise UploadTooLarge(limit)
                    digest.update(chunk)
                    file.write(chunk)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        log.info("Deploy %s of %s: bundle of %d bytes received", deploy_id, app, size)
        return {"bundle_hash": digest.hexdigest(), "size": size}

    async def abort(self, app: str, deploy_id: str) -> None:
        self._open_deploy(app, deploy_id)
        self._end(app, deploy_id)
        log.info("Deploy %s of %s aborted", deploy_id, app)

    def _end(self, app: str, deploy_id: str) -> None:
        self.node.store.end_deploy(app, deploy_id)
        self.open_apps.discard(app)
        self.upload_path(deploy_id).unlink(missing_ok=True)

    async def finish(
        self, app: str, deploy_id: str, images: dict[str, str], strategy: str, message: str
    ) -> VersionChange:
        async with self._lock(app):
            self._open_deploy(app, deploy_id)
            # A finish that began in time gets the whole ttl for unpacking and pulling.
            self.node.store.begin_deploy(app, deploy_id, self.lock_ttl)
            upload = self.upload_path(deploy_id)
            if not upload.is_file():
                raise DeployState(f"deploy {deploy_id} has no bundle yet: upload it first")
            bundle_hash = await asyncio.to_thread(_file_sha256, upload)
            bundle_dir = self.node.paths.bundle_dir(app, bundle_hash)
            created = False
            try:
                try:
                    await asyncio.to_thread(unpack, upload, bundle_dir)
                    created = True
                except BundleExists:
                    pass  # the same code as an earlier version: already unpacked
                config = await asyncio.to_thread(_load_bundle_config, bundle_dir)
                if config.name != app:
                    raise InvalidInput(
                        f"the bundle's config names the app {config.name!r}, not {app!r}",
                        [{"loc": ["config", "name"], "msg": f"expected {app!r}"}],
                    )
                refs = await self._check_images(app, config, images)
            except BaseException:
                if created:
                    shutil.rmtree(bundle_dir, ignore_errors=True)
                raise
            # Aborted (or expired) while this finish unpacked and pulled: nothing changes.
            self._open_deploy(app, deploy_id)
            store = self.node.store
            previous = _active_version(store, app)
            version = store.add_version(
                app,
                bundle_hash=bundle_hash,
                images=refs,
                vars=dict(config.vars),
                secret_names=store.secret_names(app),
                config=_config_summary(config),
                message=message,
                rollout=strategy,
            )
            # From here the version exists: whatever happens, this deploy is over.
            self._end(app, deploy_id)
            changes = describe_changes(previous, version)
            rollout = await self._activate(version, strategy)
            log.info("Deploy %s of %s: version %d is live", deploy_id, app, version.number)
            return VersionChange(version, changes, rollout)

    async def _check_images(
        self, app: str, config: Config, images: dict[str, str]
    ) -> dict[str, str]:
        """{class: "repo@digest"} once every class has an image the registry holds, pulled
        into the engine. InvalidInput names each class that is missing, unknown or absent."""
        classes = [container.class_name for container in config.containers]
        fields = [
            {"loc": ["body", "images", name], "msg": "no image digest for this container class"}
            for name in classes
            if name not in images
        ] + [
            {"loc": ["body", "images", name], "msg": "not a container class of this config"}
            for name in images
            if name not in classes
        ]
        if fields:
            raise InvalidInput("the images do not match the config's container classes", fields)
        refs = {name: f"{repository(app, name)}@{images[name]}" for name in classes}
        for name in classes:
            found = await self.node.registry.manifest_digest(repository(app, name), images[name])
            if found is None:
                fields.append(
                    {
                        "loc": ["body", "images", name],
                        "msg": f"the registry has no {repository(app, name)}@{images[name]}: "
                        "push it first",
                    }
                )
        if fields:
            raise InvalidInput("an image is missing from the node's registry", fields)
        await self._pull(refs.values())
        return refs

    async def _pull(self, images: Iterable[str]) -> None:
        images = list(images)
        if not images:
            return
        runtime = self.node.runtime
        if not isinstance(runtime, ImagePuller):
            raise DockyardError("this node's engine cannot pull images")
        for image in images:
            await runtime.pull(self.node.run_ref(image))

    async def _activate(self, version: VersionRecord, strategy: str) -> RolloutRecord | None:
        try:
            return await self.node.activate(version.app, version.number, strategy)
        except Exception as exc:
            reason = exc.public if isinstance(exc, DockyardError) else "internal error"
            raise ActivationFailed(
                f"version {version.number} was recorded but did not start ({reason}); "
                "the previous version still serves"
            ) from exc

    # rollback

    async def rollback(self, app: str, target: int | None, strategy: str) -> VersionChange:
        async with self._lock(app):
            store = self.node.store
            previous = _active_version(store, app)
            if previous is None:
                raise DeployState(f"{app} has no active version to roll back from")
            if target is None:
                older = [v for v in store.list_versions(app) if v.number < previous.number]
                if not older:
                    raise DeployState(f"{app} has no version before version {previous.number}")
                chosen = older[0]
            else:
                found = store.get_version(app, target)
                if found is None:
                    raise NotFound(f"{app} has no version {target}")
                chosen = found
            if chosen.number == previous.number:
                raise DeployState(f"version {chosen.number} of {app} is already active")
            await self._pull(chosen.images.values())
            version = _copy_version(
                store,
                chosen,
                message=f"rollback to version {chosen.number}",
                rollout=strategy,
            )
            changes = [f"rollback to version {chosen.number}", *describe_changes(previous, version)]
            rollout = await self._activate(version, strategy)
            return VersionChange(version, changes, rollout)

    # secrets

    async def put_secret(self, app: str, name: str, value: str) -> VersionChange | list[str]:
        """Store the encrypted value; with an active version, a new version that has it."""
        _check_secret_name(name)
        validate_app_name(app)
        async with self._lock(app):
            store = self.node.store
            existed = name in store.secret_names(app)
            store.put_secret(app, name, self.node.secrets.encrypt(value))
            line = f"secret {name} {'changed' if existed else 'added'}"
            log.info("Secret %s of %s %s", name, app, "changed" if existed else "added")
            return await self._secret_version(app, line)

    async def delete_secret(self, app: str, name: str) -> VersionChange | list[str]:
        validate_app_name(app)
        async with self._lock(app):
            if not self.node.store.delete_secret(app, name):
                raise NotFound(f"{app} has no secret {name!r}")
            log.info("Secret %s of %s deleted", name, app)
            return await self._secret_version(app, f"secret {name} removed")

    async def _secret_version(self, app: str, line: str) -> VersionChange | list[str]:
        store = self.node.store
        previous = _active_version(store, app)
        if previous is None:
            return [line]  # the first deploy picks it up
        version = _copy_version(store, previous, message=line, rollout="none")
        changes = describe_changes(previous, version)
        if line not in changes:  # a changed value: same names, say it anyway (no value)
            changes.append(line)
        rollout = await self._activate(version, "none")
        return VersionChange(version, changes, rollout)


class UploadTooLarge(DockyardError):
    status = 413
    public_message = None

    def __init__(self, limit: int) -> None:
        super().__init__(f"the bundle is larger than this node accepts ({limit} bytes)")


# -- helpers --------------------------------------------------------------------------------


def describe_changes(old: VersionRecord | None, new: VersionRecord) -> list[str]:
    """Human lines comparing `new` to `old` (the version active before). Names only: a
    var's or secret's value never appears."""
    lines: list[str] = []
    if old is None:
        lines.append("first version")
        lines.append(f"worker bundle {new.bundle_hash[:12]}")
    elif old.bundle_hash == new.bundle_hash:
        lines.append("worker bundle unchanged")
    else:
        lines.append(f"worker bundle changed ({old.bundle_hash[:12]} -> {new.bundle_hash[:12]})")
    old_images = old.images if old is not None else {}
    for name in sorted(old_images.keys() | new.images.keys()):
        before, after = old_images.get(name), new.images.get(name)
        if before is None:
            lines.append(f"container class {name} added ({_short(after)})")
        elif after is None:
            lines.append(f"container class {name} removed")
        elif before == after:
            lines.append(f"image of {name} unchanged")
        else:
            lines.append(f"image of {name} changed ({_short(before)} -> {_short(after)})")
    old_vars = old.vars if old is not None else {}
    for name in sorted(old_vars.keys() | new.vars.keys()):
        if name not in old_vars:
            lines.append(f"var {name} added")
        elif name not in new.vars:
            lines.append(f"var {name} removed")
        elif old_vars[name] != new.vars[name]:
            lines.append(f"var {name} changed")
    old_secrets = set(old.secret_names) if old is not None else set()
    lines += [f"secret {name} added" for name in sorted(set(new.secret_names) - old_secrets)]
    lines += [f"secret {name} removed" for name in sorted(old_secrets - set(new.secret_names))]
    return lines


def _short(image: str | None) -> str:
    digest = (image or "").rpartition("@")[2]
    return digest[: len("sha256:") + 12]


def _active_version(store: NodeStore, app: str) -> VersionRecord | None:
    record = store.get_app(app)
    if record is None or record.active_version is None:
        return None
    return store.get_version(app, record.active_version)


def _copy_version(
    store: NodeStore, source: VersionRecord, *, message: str, rollout: str
) -> VersionRecord:
    """A new version with `source`'s code, images, vars and config, and the app's
    current secret names (secret values are not versioned, only their names)."""
    return store.add_version(
        source.app,
        bundle_hash=source.bundle_hash,
        images=dict(source.images),
        vars=dict(source.vars),
        secret_names=store.secret_names(source.app),
        config=dict(source.config),
        message=message,
        rollout=rollout,
    )


def _check_secret_name(name: str) -> None:
    if SECRET_NAME.fullmatch(name) is None:
        raise InvalidInput(
            "invalid secret name",
            [
                {
                    "loc": ["path", "name"],
                    "msg": "letters, digits and underscores, not starting with a digit "
                    "(at most 256)",
                }
            ],
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _load_bundle_config(bundle_dir: Path) -> Config:
    """The bundle's config, with errors that name files relative to the bundle."""
    try:
        return load_config(bundle_dir)
    except ConfigError as exc:
        raise InvalidInput(
            _relative(str(exc), bundle_dir),
            [
                {
                    "loc": ["config", *_where(exc, bundle_dir)],
                    "msg": _relative(exc.detail, bundle_dir),
                }
            ],
        ) from None


def _where(exc: ConfigError, bundle_dir: Path) -> list[str | int]:
    where: list[str | int] = []
    if exc.file:
        where.append(_relative(exc.file, bundle_dir))
    if exc.line is not None:
        where.append(exc.line)
    if exc.path:
        where.append(exc.path)
    return where


def _relative(text: str, bundle_dir: Path) -> str:
    """`text` without the node's own folders: paths in the bundle as the deployer sees them."""
    for root in {str(bundle_dir.resolve()), str(bundle_dir)}:
        text = text.replace(root + "/", "").replace(root, ".")
    return text


def _config_summary(config: Config) -> dict[str, Any]:
    """VersionRecord.config: what `versions list` shows and what routing and rollouts read."""
    from .rollout import rollout_summary

    return {
        "main": config.main,
        "classes": [container.class_name for container in config.containers],
        "routes": config.route_hosts(),
        "rollout": rollout_summary(config),
    }
