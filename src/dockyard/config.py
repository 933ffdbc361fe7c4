"""Find and load a project's wrangler config (`wrangler.jsonc`, `wrangler.json`, `wrangler.toml`).

The schema is Cloudflare's, so an existing config works unchanged. Every error is a
`ConfigError` naming the file, the line (JSONC and TOML), the key path and what is allowed:

    wrangler.jsonc:14: containers[0].max_instances: expected an integer >= 0, got "ten"

Keys Dockyard does not know are kept (`extra="allow"`) and reported in `Config.warnings`.
"""

from __future__ import annotations

import ast
import datetime
import itertools
import json
import keyword
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar

import json5
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
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dockyard._jsonc import child_path, key_lines, syntax_error_line, toml_key_lines
from dockyard.errors import ConfigError

__all__ = [
    "CONFIG_NAMES",
    "INSTANCE_TYPES",
    "Config",
    "ContainerConfig",
    "DevConfig",
    "DurableObjectBinding",
    "DurableObjects",
    "InstanceSpec",
    "LogsConfig",
    "Migration",
    "Observability",
    "RenamedClass",
    "find_config",
    "load_config",
]

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


class Migration(_Model):
    unsupported_keys = frozenset({"transferred_classes"})

    tag: NonEmptyStr
    new_sqlite_classes: list[str] = []
    new_classes: list[str] = []
    renamed_classes: list[RenamedClass] = []
    deleted_classes: list[str] = []


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


class Config(_Model):
    unsupported_keys = frozenset(
        "$schema account_id workers_dev preview_urls route routes kv_namespaces r2_buckets "
        "d1_databases queues services triggers assets build env placement limits minify "
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
    # Not read from the file: filled in by load_config.
    project_dir: Path = Field(default_factory=Path, exclude=True)
    config_path: Path = Field(default_factory=lambda: Path(CONFIG_NAMES[0]), exclude=True)
    warnings: list[str] = Field(default_factory=list, exclude=True)
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


_NOT_FROM_FILE = ("project_dir", "config_path", "warnings", "secrets")


# -- loading --------------------------------------------------------------------------------


def find_config(project_dir: Path, explicit: Path | None = None) -> Path:
    """The config file to use: `explicit` (relative to `project_dir`), else the first of
    wrangler.jsonc, wrangler.json, wrangler.toml in `project_dir`."""
    if explicit is not None:
        path = explicit if explicit.is_absolute() else project_dir / explicit
        if not path.is_file():
            raise ConfigError("config file not found", file=str(path))
        return path
    for name in CONFIG_NAMES:
        if (project_dir / name).is_file():
            return project_dir / name
    raise ConfigError(f"no {', '.join(CONFIG_NAMES[:-1])} or {CONFIG_NAMES[-1]} in {project_dir}")


def load_config(project_dir: Path | str, config_path: Path | str | None = None) -> Config:
    """Read, parse and check a project's config, its main module's classes and `.dev.vars`."""
    project_dir = Path(project_dir).resolve()
    path = find_config(project_dir, Path(config_path) if config_path is not None else None)
    source = _Source(path.resolve(), project_dir)
    data = source.parse()
    warnings = [
        source.warning(key, f'unknown key "{key}" (ignored)')
        for key in _NOT_FROM_FILE
        if data.pop(key, None) is not None
    ]
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise source.validation_error(exc) from None
    config.project_dir = project_dir
    config.config_path = source.path
    for container in config.containers:
        container._base_dir = source.path.parent
    warnings += _extra_key_warnings(config, "", source)
    warnings += _cross_check(config, source)
    config.warnings = warnings
    config.secrets = _read_dev_vars(project_dir / ".dev.vars", project_dir)
    return config


def _display_name(path: Path, project_dir: Path) -> str:
    try:
        return str(path.relative_to(project_dir))
    except ValueError:
        return str(path)


def _show(value: object) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_EXPECTED = {
    "missing": "required key is missing",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected an object",
    "model_type": "expected an object",
    "model_attributes_type": "expected an object",
}


class _Source:
    """One config file: its text, the line of every key path, and error/warning makers."""

    def __init__(self, path: Path, project_dir: Path) -> None:
        self.path = path
        self.name = _display_name(path, project_dir)
        self.lines: dict[str, int] = {}

    def parse(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config: {exc}", file=self.name) from None
        if self.path.suffix == ".toml":
            try:
                data: object = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                found = re.search(r"\(at line (\d+)", str(exc))
                message = re.sub(r"\s*\(at line .*\)$", "", str(exc))
                line = int(found[1]) if found else None
                raise ConfigError(f"invalid TOML: {message}", file=self.name, line=line) from None
            self.lines = toml_key_lines(text)
        else:
            try:
                data = json5.loads(text)
            except ValueError as exc:
                line, message = syntax_error_line(exc)
                raise ConfigError(f"invalid JSONC: {message}", file=self.name, line=line) from None
            self.lines = key_lines(text)
        if not isinstance(data, dict):
            raise self.error("", f"expected an object at the top level, got {_show(data)}")
        return data

    def line_for(self, path: str) -> int | None:
        # A missing key has no line of its own: use the nearest enclosing one.
        while path not in self.lines and path:
            path = re.sub(r"(\[\d+\]|\.?[^.\[]+)$", "", path)
        return self.lines.get(path)

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.name, line=self.line_for(path), path=path or None)

    def warning(self, path: str, message: str) -> str:
        line = self.line_for(path)
        return f"{self.name}:{line}: {message}" if line else f"{self.name}: {message}"

    def validation_error(self, exc: ValidationError) -> ConfigError:
        """One ConfigError for all of pydantic's complaints, the first one up front."""
        errors = []
        for err in exc.errors():
            path = ""
            for part in err["loc"]:
                if not (isinstance(part, str) and part.startswith("<")):
                    path = child_path(path, part)
            message = _EXPECTED.get(err["type"], err["msg"])
            if err["type"] != "missing":
                message = f"{message}, got {_show(err['input'])}"
            errors.append(self.error(path, message))
        first = errors[0]
        if len(errors) == 1:
            return first
        rest = "".join(f"\n{e}" for e in errors[1:])
        return ConfigError(first.detail + rest, file=first.file, line=first.line, path=first.path)


def _extra_key_warnings(model: BaseModel, path: str, source: _Source) -> Iterator[str]:
    unsupported: frozenset[str] = getattr(model, "unsupported_keys", frozenset())
    for key in model.model_extra or {}:
        key_path = child_path(path, key)
        if key == "$schema":
            continue
        if key in unsupported:
            message = f'key "{key_path}" is not supported by dockyard (ignored)'
            yield source.warning(key_path, message)
        else:
            yield source.warning(key_path, f'unknown key "{key_path}" (ignored)')
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = type(model).model_fields[name].alias or name
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            if isinstance(item, BaseModel):
                item_path = child_path(path, key)
                if index is not None:
                    item_path = child_path(item_path, index)
                yield from _extra_key_warnings(item, item_path, source)


def _cross_check(config: Config, source: _Source) -> list[str]:
    """Checks that span keys or touch the file system. Raises the first error; returns warnings."""
    main = config.main_path
    if not main.is_file():
        raise source.error(
            "main",
            f'file "{config.main}" not found (expected a Python file relative to '
            f"{config.config_path.parent})",
        )
    defined = _top_level_names(main, _display_name(main, config.project_dir))

    seen: dict[str, int] = {}
    for i, binding in enumerate(config.durable_objects.bindings):
        path = f"durable_objects.bindings[{i}]"
        if binding.name in seen:
            raise source.error(
                f"{path}.name",
                f'duplicate binding name "{binding.name}" (already used by '
                f"durable_objects.bindings[{seen[binding.name]}]); expected unique names",
            )
        seen[binding.name] = i
        if binding.script_name is None and binding.class_name not in defined:
            raise source.error(
                f"{path}.class_name",
                f'class "{binding.class_name}" is not defined in {config.main} '
                f'(expected a top-level "class {binding.class_name}(...)" there)',
            )

    bound = {b.class_name for b in config.durable_objects.bindings if b.script_name is None}
    sqlite = {name for m in config.migrations for name in m.new_sqlite_classes}
    containers: dict[str, int] = {}
    warnings = []
    for i, container in enumerate(config.containers):
        path = f"containers[{i}]"
        if container.class_name in containers:
            raise source.error(
                f"{path}.class_name",
                f'duplicate container class_name "{container.class_name}" (already used by '
                f"containers[{containers[container.class_name]}]); expected one entry per class",
            )
        containers[container.class_name] = i
        if container.class_name not in bound:
            raise source.error(
                f"{path}.class_name",
                f'no durable_objects binding has class_name "{container.class_name}" (expected '
                f'one in durable_objects.bindings, e.g. {{"name": "{container.class_name.upper()}"'
                f', "class_name": "{container.class_name}"}})',
            )
        _check_image(container, path, source)
        if container.class_name not in sqlite:
            warnings.append(
                source.warning(
                    f"{path}.class_name",
                    f'{path}.class_name: class "{container.class_name}" is in no migration\'s '
                    'new_sqlite_classes (add e.g. {"tag": "v1", "new_sqlite_classes": '
                    f'["{container.class_name}"]}} to migrations)',
                )
            )
    return warnings


def _check_image(container: ContainerConfig, path: str, source: _Source) -> None:
    dockerfile = container.dockerfile_path
    if dockerfile is not None and not dockerfile.is_file():
        raise source.error(
            f"{path}.image",
            f'Dockerfile "{container.image}" not found (expected a Dockerfile path relative '
            'to the config\'s folder or an image reference like "registry/name:tag")',
        )
    context = container.build_context_path
    if container.image_build_context is not None and not (context and context.is_dir()):
        raise source.error(
            f"{path}.image_build_context",
            f'folder "{container.image_build_context}" not found (expected a folder relative '
            "to the config's folder)",
        )


def _top_level_names(main: Path, display: str) -> set[str]:
    """Names the main module binds at top level: classes, and imported or assigned names
    (a class imported into main is as exported as one defined there)."""
    try:
        tree = ast.parse(main.read_bytes(), filename=display)
    except SyntaxError as exc:
        raise ConfigError(
            f"invalid Python syntax: {exc.msg}", file=display, line=exc.lineno
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read main module: {exc}", file=display) from None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


_DEV_VAR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)")


def _read_dev_vars(path: Path, project_dir: Path) -> dict[str, str]:
    """`.dev.vars`: KEY=VALUE lines, optionally quoted values, `#` comments, blank lines."""
    if not path.is_file():
        return {}
    name = _display_name(path, project_dir)
    secrets = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _DEV_VAR.fullmatch(line)
        if match is None:
            raise ConfigError(
                f"expected KEY=VALUE (KEY of letters, digits and underscores), got {_show(line)}",
                file=name,
                line=number,
            )
        value = match[2].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        secrets[match[1]] = value
    return secrets
