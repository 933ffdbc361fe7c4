"""The control-plane API's request and response bodies (pydantic v2), one model per shape.

Requests are strict about what they accept (unknown keys refused, so a typo in a field
name is a 422 rather than a silent default); responses are built from the store's
records by the ``from_*`` helpers, so a route never hand-writes a dict. docs/api.md shows
each of them on the wire.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..containers.runtime import ContainerInfo
from .store import AppRecord, RolloutRecord, VersionRecord

__all__ = [
    "DIGEST_PATTERN",
    "AppDetailOut",
    "AppOut",
    "AppsOut",
    "BundleOut",
    "ContainerOut",
    "ContainersOut",
    "DeletedOut",
    "DeployBeginIn",
    "DeployBeginOut",
    "ErrorOut",
    "ExecIn",
    "ExecOut",
    "FieldError",
    "FinishIn",
    "HealthOut",
    "ImageOut",
    "ImagesOut",
    "LogsOut",
    "NodeOut",
    "PruneOut",
    "RollbackIn",
    "RolloutOut",
    "SecretChangeOut",
    "SecretIn",
    "SecretsOut",
    "StoppedOut",
    "TokenOut",
    "VersionChangeOut",
    "VersionOut",
    "VersionsOut",
]

Strategy = Literal["gradual", "immediate", "none"]
# A manifest digest as the registry names it.
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
ClassName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
Digest = Annotated[str, StringConstraints(pattern=DIGEST_PATTERN)]
# Cloudflare's limit for one secret's value.
MAX_SECRET_BYTES = 5 * 1024


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors ---------------------------------------------------------------------------------


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class ErrorOut(BaseModel):
    error: str
    id: str
    fields: list[FieldError] | None = None


# -- node -----------------------------------------------------------------------------------


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class NodeOut(BaseModel):
    owner: str
    registry: str
    apps: int
    max_upload_bytes: int


# -- apps and versions ----------------------------------------------------------------------


class VersionOut(BaseModel):
    number: int
    created_at: float
    bundle_hash: str
    images: dict[str, str]
    vars: dict[str, Any]
    secret_names: list[str]
    config: dict[str, Any]
    message: str
    rollout: Strategy
    active: bool

    @classmethod
    def from_record(cls, record: VersionRecord, active: int | None) -> VersionOut:
        return cls(
            number=record.number,
            created_at=record.created_at,
            bundle_hash=record.bundle_hash,
            images=record.images,
            vars=record.vars,
            secret_names=record.secret_names,
            config=record.config,
            message=record.message,
            rollout=record.rollout,  # type: ignore[arg-type]  # the store checks it
            active=record.number == active,
        )


class VersionsOut(BaseModel):
    versions: list[VersionOut]


class RolloutOut(BaseModel):
    app: str
    version: int
    from_version: int | None
    state: Literal["running", "done", "failed"]
    steps: list[int]
    step: int
    replaced: list[str]
    total: int
    started_at: float
    updated_at: float
    error: str | None

    @classmethod
    def from_record(cls, record: RolloutRecord | None) -> RolloutOut | None:
        if record is None:
            return None
        return cls(
            app=record.app,
            version=record.version,
            from_version=record.from_version,
            state=record.state,  # type: ignore[arg-type]  # the store checks it
            steps=list(record.steps),
            step=record.step,
            replaced=list(record.replaced),
            total=record.total,
            started_at=record.started_at,
            updated_at=record.updated_at,
            error=record.error,
        )


class AppOut(BaseModel):
    name: str
    created_at: float
    active_version: int | None

    @classmethod
    def from_record(cls, record: AppRecord) -> AppOut:
        return cls(
            name=record.name, created_at=record.created_at, active_version=record.active_version
        )


class AppsOut(BaseModel):
    apps: list[AppOut]


class AppDetailOut(AppOut):
    version: VersionOut | None
    versions: int
    secrets: list[str]
    rollout: RolloutOut | None


class DeletedOut(BaseModel):
    deleted: str


# -- deploys --------------------------------------------------------------------------------


class DeployBeginIn(_In):
    # The container classes the deployer will push, so the answer names their
    # repositories; optional (the client may derive "<app>/<class lower>" itself).
    classes: list[ClassName] = Field(default_factory=list, max_length=64)


class DeployBeginOut(BaseModel):
    deploy_id: str
    registry: str
    repositories: dict[str, str]
    expires_at: float


class BundleOut(BaseModel):
    bundle_hash: str
    size: int


class FinishIn(_In):
    # class name -> the manifest digest its push returned
    images: dict[str, Digest] = Field(default_factory=dict)
    rollout: Strategy = "gradual"
    message: str = Field(default="", max_length=1000)


class VersionChangeOut(BaseModel):
    """What a finish, a rollback or a secret change answers: the new active version."""

    version: VersionOut
    changes: list[str]
    rollout: RolloutOut | None


class RollbackIn(_In):
    # None: the newest version older than the active one.
    version: int | None = Field(default=None, ge=1)
    rollout: Strategy = "gradual"


# -- secrets --------------------------------------------------------------------------------


class SecretIn(_In):
    value: str = Field(max_length=MAX_SECRET_BYTES)


class SecretsOut(BaseModel):
    secrets: list[str]


class SecretChangeOut(BaseModel):
    name: str
    # The version the change created and activated; None when the app has no active
    # version yet (its first deploy picks the secret up).
    version: VersionOut | None
    changes: list[str]


# -- containers -----------------------------------------------------------------------------


class ContainerOut(BaseModel):
    id: str
    name: str
    app: str
    class_name: str | None
    object_id: str | None
    version: str | None
    image: str
    status: str
    running: bool
    exit_code: int | None
    oom_killed: bool
    started_at: str | None
    finished_at: str | None

    @classmethod
    def from_info(cls, info: ContainerInfo) -> ContainerOut:
        labels = info.labels
        return cls(
            id=info.id,
            name=info.name,
            app=labels.get("dockyard.app", ""),
            class_name=labels.get("dockyard.class"),
            object_id=labels.get("dockyard.object_id"),
            version=labels.get("dockyard.version"),
            image=info.image,
            status=info.status,
            running=info.running,
            exit_code=info.exit_code,
            oom_killed=info.oom_killed,
            started_at=info.started_at.isoformat() if info.started_at else None,
            finished_at=info.finished_at.isoformat() if info.finished_at else None,
        )


class ContainersOut(BaseModel):
    containers: list[ContainerOut]


class LogsOut(BaseModel):
    lines: list[str]


class ExecIn(_In):
    cmd: list[str] = Field(min_length=1, max_length=1000)


class ExecOut(BaseModel):
    exit_code: int
    stdout: str
    stderr: str


class StoppedOut(BaseModel):
    id: str
    stopped: bool = True


# -- images and tokens ----------------------------------------------------------------------


class ImageOut(BaseModel):
    repo: str
    tags: list[str]
    digest: str
    size: int | None
    referenced: bool


class ImagesOut(BaseModel):
    images: list[ImageOut]


class PruneOut(BaseModel):
    deleted: list[str]
    kept: int


class TokenOut(BaseModel):
    token: str
