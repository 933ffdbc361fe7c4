"""The typed models of a wrangler config, with their validators (see config.py).

Over 400 lines: it is every model of the wrangler config, each short, with the
validators they share; config.py loads them, and splitting the models would split one
schema.
"""

from __future__ import annotations

import datetime
import itertools
import keyword
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    PlainValidator,
    PrivateAttr,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

CONFIG_NAMES = ("wrangler.jsonc", "wrangler.json", "wrangler.toml")


# -- field types whose errors read as "expected ..." ------------------------------------


def _fail(expected: str) -> PydanticCustomError:
    # The text goes through the context so braces in it are never read as placeholders.
    return PydanticCustomError("dockyard", "{expected}", {"expected": expected})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_between(low: int, high: int | None = None) -> PlainValidator:
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def check(value: Any) -> int:
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise _fail(f"expected {expected}")
        return int(value)

    return PlainValidator(check)


def _positive_number(value: Any) -> float:
    if not (_is_int(value) or isinstance(value, float)) or not 0 < value < float("inf"):
        raise _fail("expected a number > 0")
    return float(value)


def _pattern(regex: str, expected: str) -> AfterValidator:
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise _fail(f"expected {expected}")
        return value

    return AfterValidator(check)


def _date(value: Any) -> str:
    if isinstance(value, datetime.date):  # TOML's bare 2025-05-23
        return value.isoformat()
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        try:
            return datetime.date.fromisoformat(value).isoformat()
        except ValueError:
            pass
    raise _fail("expected a date as YYYY-MM-DD")


def _identifier(value: str) -> str:
    if not value.isidentifier() or keyword.iskeyword(value):
        raise _fail(
            "expected a valid Python identifier (letters, digits and underscores, "
            "not starting with a digit), since bindings become attributes of env"
        )
    return value


def _rollout_steps(value: Any) -> int | list[int] | None:
    if value is None or (_is_int(value) and value in (5, 10, 20, 25, 50, 100)):
        return value
    if isinstance(value, list) and value and all(_is_int(step) for step in value):
        ascending = all(a < b for a, b in itertools.pairwise(value))
        if ascending and value[0] >= 10 and value[-1] == 100:
            return value
    raise _fail(
        "expected one of 5, 10, 20, 25, 50, 100 or an ascending list of "
        "percentages from 10 to 100 ending in 100"
    )


NonNegativeInt = Annotated[int, _int_between(0)]
PositiveInt = Annotated[int, _int_between(1)]
PositiveNumber = Annotated[float, PlainValidator(_positive_number)]
Port = Annotated[int, _int_between(1, 65535)]
NonEmptyStr = Annotated[str, _pattern(r".*\S.*", "a non-empty string")]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    # Cloudflare keys Dockyard accepts but does not act on: warned about as such.
    unsupported_keys: ClassVar[frozenset[str]] = frozenset()


# -- instance types -----------------------------------------------------------------------


class InstanceSpec(_Model):
    vcpu: PositiveNumber = 0.0625
    memory_mib: PositiveInt = 256
    disk_mb: PositiveInt = 2000


_LITE = InstanceSpec(vcpu=0.0625, memory_mib=256, disk_mb=2000)
_STANDARD_1 = InstanceSpec(vcpu=0.5, memory_mib=4096, disk_mb=8000)
INSTANCE_TYPES: dict[str, InstanceSpec] = {
    "lite": _LITE,
    "dev": _LITE,
    "basic": InstanceSpec(vcpu=0.25, memory_mib=1024, disk_mb=4000),
    "standard-1": _STANDARD_1,
    "standard": _STANDARD_1,
    "standard-2": InstanceSpec(vcpu=1, memory_mib=6144, disk_mb=12000),
    "standard-3": InstanceSpec(vcpu=2, memory_mib=8192, disk_mb=16000),
    "standard-4": InstanceSpec(vcpu=4, memory_mib=12288, disk_mb=20000),
}
_TYPE_NAMES = ", ".join(INSTANCE_TYPES)


def _known_instance_type(value: str) -> str:
    if value not in INSTANCE_TYPES:
        raise _fail(f"expected one of {_TYPE_NAMES}")
    return value


def _instance_type_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "<name>"
    return "<custom>" if isinstance(value, dict | InstanceSpec) else None


# Loc entries in <angle brackets> are union tags, not keys; they are dropped from paths.
InstanceType = Annotated[
    Annotated[Annotated[str, AfterValidator(_known_instance_type)], Tag("<name>")]
    | Annotated[InstanceSpec, Tag("<custom>")],
    Discriminator(
        _instance_type_tag,
        custom_error_type="dockyard",
        custom_error_message=f"expected one of {_TYPE_NAMES} or an object with "
        "vcpu, memory_mib and disk_mb",
    ),
]


# -- the models -----------------------------------------------------------------------------


class ContainerConfig(_Model):
    unsupported_keys = frozenset(
        "scheduling_policy images rollout_kind constraints affinities ssh wrangler_ssh "
        "authorized_keys trusted_user_ca_keys unsafe configuration instances".split()
    )

    class_name: NonEmptyStr
    image: NonEmptyStr
    image_build_context: str | None = None
    image_vars: dict[str, str] = {}
    max_instances: NonNegativeInt = 20
    instance_type: InstanceType = "lite"
    name: str | None = None
    rollout_step_percentage: Annotated[int | list[int] | None, PlainValidator(_rollout_steps)] = (
        None
    )
    rollout_active_grace_period: NonNegativeInt = 0
    _base_dir: Path = PrivateAttr(default_factory=Path)

    @property
    def is_dockerfile(self) -> bool:
        """Whether `image` names a Dockerfile to build rather than an image to run."""
        image = self.image
        return (
            (self._base_dir / image).is_file()
            or image.endswith("Dockerfile")
            or image.startswith(("./", "../", "/"))
        )

    @property
    def dockerfile_path(self) -> Path | None:
        return self._base_dir / self.image if self.is_dockerfile else None

    @property
    def build_context_path(self) -> Path | None:
        """`image_build_context` if set, else the Dockerfile's folder; None for an image ref."""
        if self.image_build_context is not None:
            return self._base_dir / self.image_build_context
        dockerfile = self.dockerfile_path
        return dockerfile.parent if dockerfile is not None else None

    @property
    def resources(self) -> InstanceSpec:
        spec = self.instance_type
        return INSTANCE_TYPES[spec] if isinstance(spec, str) else spec


class DurableObjectBinding(_Model):
    unsupported_keys = frozenset({"environment"})

    name: Annotated[str, AfterValidator(_identifier)]
    class_name: NonEmptyStr
    script_name: str | None = None


class DurableObjects(_Model):
    bindings: list[DurableObjectBinding] = []


class RenamedClass(_Model):
    from_: str = Field(alias="from")
    to: str


class TransferredClass(_Model):
    from_: str = Field(alias="from")
    from_script: str
    to: str


class Migration(_Model):
    """One tagged step; applied to the stored objects once (see objects/migrations.py)."""

    tag: NonEmptyStr
    new_sqlite_classes: list[str] = []
    new_classes: list[str] = []
    renamed_classes: list[RenamedClass] = []
    deleted_classes: list[str] = []
    # Accepted as Cloudflare writes it; applying one is refused (another script's objects
    # are out of this app's reach), see docs/migrations.md.
    transferred_classes: list[TransferredClass] = []

    def classes(self) -> list[tuple[str, str]]:
        """Every class this step names, with the key it is named under."""
        named = [(f"new_sqlite_classes[{i}]", n) for i, n in enumerate(self.new_sqlite_classes)]
        named += [(f"new_classes[{i}]", n) for i, n in enumerate(self.new_classes)]
        for i, r in enumerate(self.renamed_classes):
            named += [(f"renamed_classes[{i}].from", r.from_), (f"renamed_classes[{i}].to", r.to)]
        named += [(f"deleted_classes[{i}]", n) for i, n in enumerate(self.deleted_classes)]
        named += [
            (f"transferred_classes[{i}].to", t.to) for i, t in enumerate(self.transferred_classes)
        ]
        return named


class LogsConfig(_Model):
    enabled: bool = False


class Observability(_Model):
    enabled: bool = False
    logs: LogsConfig | None = None


class DevConfig(_Model):
    unsupported_keys = frozenset(
        "enable_containers container_engine local_protocol upstream_protocol host "
        "inspector_port".split()
    )

    ip: NonEmptyStr = "127.0.0.1"
    port: Port = 8787


class KvNamespace(_Model):
    binding: Annotated[str, AfterValidator(_identifier)]
    id: NonEmptyStr | None = None
    preview_id: str | None = None


class D1Database(_Model):
    unsupported_keys = frozenset({"remote"})

    binding: Annotated[str, AfterValidator(_identifier)]
    database_name: NonEmptyStr | None = None
    database_id: str | None = None
    preview_database_id: str | None = None
    migrations_dir: NonEmptyStr = "migrations"
    migrations_table: NonEmptyStr = "d1_migrations"

    @property
    def name(self) -> str:
        """What `dockyard d1 ... NAME` and the local file are called: the database name."""
        return self.database_name or self.binding


def _cron(value: Any) -> str:
    from dockyard.bindings.cron import CronError, parse_cron

    if not isinstance(value, str):
        raise _fail("expected a cron expression string")
    try:
        parse_cron(value)
    except CronError as error:
        raise _fail(f"invalid cron expression {value!r}: {error}") from None
    return value


class Triggers(_Model):
    crons: list[Annotated[str, PlainValidator(_cron)]] = []


def _run_worker_first(value: Any) -> bool | list[str]:
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        for pattern in value:
            if not pattern.lstrip("!").startswith("/"):
                raise _fail(f'expected route patterns starting with "/" (or "!/"), got {pattern!r}')
        return value
    raise _fail('expected true, false or a list of route patterns like ["/api/*"]')


class AssetsConfig(_Model):
    directory: NonEmptyStr | None = None
    binding: Annotated[str, AfterValidator(_identifier)] | None = None
    not_found_handling: Annotated[
        str,
        _pattern(
            "none|404-page|single-page-application",
            '"none", "404-page" or "single-page-application"',
        ),
    ] = "none"
    html_handling: Annotated[
        str,
        _pattern(
            "auto-trailing-slash|force-trailing-slash|drop-trailing-slash|none",
            '"auto-trailing-slash", "force-trailing-slash", "drop-trailing-slash" or "none"',
        ),
    ] = "auto-trailing-slash"
    run_worker_first: Annotated[bool | list[str], PlainValidator(_run_worker_first)] = False


class Route(_Model):
    """A wrangler route: on a node, requests whose Host is the pattern's host reach the app."""

    pattern: NonEmptyStr
    custom_domain: bool = False
    zone_name: str | None = None
    zone_id: str | None = None


class Config(_Model):
    unsupported_keys = frozenset(
        "$schema account_id workers_dev preview_urls r2_buckets "
        "queues services build placement limits minify "
        "keep_vars send_metrics upload_source_maps no_bundle rules".split()
    )

    name: Annotated[
        str,
        _pattern(
            r"[a-z0-9]([a-z0-9-]*[a-z0-9])?",
            "lowercase letters, digits and dashes (not at either end)",
        ),
    ]
    main: Annotated[str, _pattern(r".*\S.*\.py", 'a path to a Python file ending in ".py"')]
    compatibility_date: Annotated[str | None, PlainValidator(_date)] = None
    compatibility_flags: list[str] = []
    vars: dict[str, JsonValue] = {}
    observability: Observability = Observability()
    containers: list[ContainerConfig] = []
    durable_objects: DurableObjects = DurableObjects()
    migrations: list[Migration] = []
    dev: DevConfig = DevConfig()
    kv_namespaces: list[KvNamespace] = []
    d1_databases: list[D1Database] = []
    triggers: Triggers = Triggers()
    assets: AssetsConfig | None = None
    route: Route | NonEmptyStr | None = None
    routes: list[Route | NonEmptyStr] = []
    # Not read from the file: filled in by load_config.
    project_dir: Path = Field(default_factory=Path, exclude=True)
    config_path: Path = Field(default_factory=lambda: Path(CONFIG_NAMES[0]), exclude=True)
    warnings: list[str] = Field(default_factory=list, exclude=True)
    environment: str | None = Field(default=None, exclude=True)  # the env.<name> in use

    def route_hosts(self) -> list[str]:
        """The host of every route (``example.com/*`` -> ``example.com``), as a node
        routes them; patterns with a wildcard in the host are left out."""
        hosts = []
        for route in [*([self.route] if self.route is not None else []), *self.routes]:
            pattern = route.pattern if isinstance(route, Route) else route
            host = pattern.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
            if host and "*" not in host and host not in hosts:
                hosts.append(host)
        return hosts

    secrets: dict[str, str] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="after")
    def _default_container_names(self) -> Config:
        for container in self.containers:
            if container.name is None:
                container.name = f"{self.name}-{container.class_name.lower().replace(' ', '-')}"
        return self

    @property
    def main_path(self) -> Path:
        return self.config_path.parent / self.main

    def container_for(self, class_name: str) -> ContainerConfig | None:
        return next((c for c in self.containers if c.class_name == class_name), None)
