"""Find and load a project's wrangler config (`wrangler.jsonc`, `wrangler.json`, `wrangler.toml`).

The schema is Cloudflare's, so an existing config works unchanged. Every error is a
`ConfigError` naming the file, the line (JSONC and TOML), the key path and what is allowed:

    wrangler.jsonc:14: containers[0].max_instances: expected an integer >= 0, got "ten"

Keys Dockyard does not know are kept (`extra="allow"`) and reported in `Config.warnings`.

Over 400 lines: every cross-key check (bindings, containers, migrations, environments,
cron, assets) needs the source's line numbers, which live here; the models are in
`_config_models.py` and the line finding in `_jsonc.py`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import json5
from pydantic import (
    BaseModel,
    ValidationError,
)

from dockyard._config_models import (
    CONFIG_NAMES,
    INSTANCE_TYPES,
    Config,
    ContainerConfig,
    DevConfig,
    DurableObjectBinding,
    DurableObjects,
    InstanceSpec,
    LogsConfig,
    Migration,
    Observability,
    RenamedClass,
    TransferredClass,
)
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
    "TransferredClass",
    "config_error",
    "find_config",
    "load_config",
    "main_names",
]

_NOT_FROM_FILE = ("project_dir", "config_path", "warnings", "secrets", "environment")


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


def load_config(
    project_dir: Path | str, config_path: Path | str | None = None, env: str | None = None
) -> Config:
    """Read, parse and check a project's config, its main module's classes and `.dev.vars`.

    ``env`` (default: the ``CLOUDFLARE_ENV`` environment variable, as wrangler reads it)
    selects an ``env.<name>`` section, merged by Cloudflare's rules (see ``_environment``).
    """
    project_dir = Path(project_dir).resolve()
    path = find_config(project_dir, Path(config_path) if config_path is not None else None)
    source = _Source(path.resolve(), project_dir)
    data = source.parse()
    warnings = [
        source.warning(key, f'unknown key "{key}" (ignored)')
        for key in _NOT_FROM_FILE
        if data.pop(key, None) is not None
    ]
    name = env if env is not None else os.environ.get("CLOUDFLARE_ENV") or None
    data, env_warnings = _environment(data, name, source)
    warnings += env_warnings
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise source.validation_error(exc) from None
    config.project_dir = project_dir
    config.config_path = source.path
    config.environment = name
    for container in config.containers:
        container._base_dir = source.path.parent
    warnings += _extra_key_warnings(config, "", source)
    warnings += _cross_check(config, source)
    config.warnings = warnings
    dev_vars = project_dir / ".dev.vars"
    if name is not None and (project_dir / f".dev.vars.{name}").is_file():
        dev_vars = project_dir / f".dev.vars.{name}"
    config.secrets = _read_dev_vars(dev_vars, project_dir)
    return config


# Cloudflare's environment rules: these keys are never inherited from the top level (an
# environment states its own bindings), these exist only at the top level, and every
# other key is inherited unless the environment overrides it.
NON_INHERITABLE = frozenset(
    "vars define durable_objects kv_namespaces d1_databases r2_buckets services queues "
    "containers workflows ai vectorize hyperdrive analytics_engine_datasets".split()
)
TOP_LEVEL_ONLY = frozenset("migrations dev send_metrics keep_vars site".split())


def _environment(
    data: dict[str, Any], name: str | None, source: _Source
) -> tuple[dict[str, Any], list[str]]:
    """The top-level config with ``env.<name>`` applied; warnings for what is not inherited."""
    sections = data.pop("env", None)
    if sections is not None and not (
        isinstance(sections, dict) and all(isinstance(v, dict) for v in sections.values())
    ):
        raise source.error("env", "expected an object of environments, each an object")
    if name is None:
        return data, []
    known = sorted(sections or {})
    if name not in (sections or {}):
        shown = ", ".join(known) or "none"
        raise source.error("env", f'no environment "{name}" (known: {shown})')
    section: dict[str, Any] = sections[name]  # type: ignore[index]
    merged = {k: v for k, v in data.items() if k not in NON_INHERITABLE}
    warnings = []
    for key in sorted(NON_INHERITABLE & data.keys() - section.keys()):
        warnings.append(
            source.warning(
                key,
                f'"{key}" exists at the top level but not in "env.{name}": it is not '
                "inherited, so this environment has none",
            )
        )
    for key, value in section.items():
        if key in TOP_LEVEL_ONLY:
            warnings.append(
                source.warning(
                    f"env.{name}.{key}", f'"{key}" is only read at the top level (ignored here)'
                )
            )
            continue
        merged[key] = value
        source.from_environment[key] = f"env.{name}"
    if "name" not in section and isinstance(data.get("name"), str):
        merged["name"] = f"{data['name']}-{name}"
    return merged, warnings


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
        # Top-level keys whose value came from an env.<name> section, and that prefix.
        self.from_environment: dict[str, str] = {}

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

    def in_file(self, path: str) -> str:
        """Where ``path`` of the merged config is written (``env.staging.vars.X``)."""
        top = re.split(r"[.\[]", path, maxsplit=1)[0]
        prefix = self.from_environment.get(top)
        return f"{prefix}.{path}" if prefix else path

    def line_for(self, path: str) -> int | None:
        path = self.in_file(path)
        # A missing key has no line of its own: use the nearest enclosing one.
        while path not in self.lines and path:
            path = re.sub(r"(\[\d+\]|\.?[^.\[]+)$", "", path)
        return self.lines.get(path)

    def error(self, path: str, message: str) -> ConfigError:
        shown = self.in_file(path)
        return ConfigError(message, file=self.name, line=self.line_for(path), path=shown or None)

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

    _check_bindings(config, source)
    _check_migrations(config, source)

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


def _check_migrations(config: Config, source: _Source) -> None:
    """Tags are unique; a step names each class once; no binding is to a class the
    migrations renamed away or deleted (Cloudflare's rules). What a step does to stored
    objects is checked when it is applied (objects/migrations.py)."""
    tags: dict[str, int] = {}
    # Each class's last word in the migrations: (what happened, which step, new name).
    fate: dict[str, tuple[str, int, str]] = {}
    for i, migration in enumerate(config.migrations):
        path = f"migrations[{i}]"
        if migration.tag in tags:
            raise source.error(
                f"{path}.tag",
                f'duplicate tag "{migration.tag}" (already used by '
                f"migrations[{tags[migration.tag]}]); expected a unique tag per migration",
            )
        tags[migration.tag] = i
        named: dict[str, str] = {}
        for key, name in migration.classes():
            if not name.isidentifier():
                raise source.error(
                    f"{path}.{key}", f'expected a class name (a Python identifier), got "{name}"'
                )
            if name in named:
                raise source.error(
                    f"{path}.{key}",
                    f'class "{name}" is already named by {path}.{named[name]}; a migration may '
                    "name each class once (split it into two tagged migrations)",
                )
            named[name] = key
        for name in [*migration.new_sqlite_classes, *migration.new_classes]:
            fate[name] = ("live", i, name)
        for renamed in migration.renamed_classes:
            fate[renamed.from_] = ("renamed", i, renamed.to)
            fate[renamed.to] = ("live", i, renamed.to)
        for name in migration.deleted_classes:
            fate[name] = ("deleted", i, name)
        for transferred in migration.transferred_classes:
            fate[transferred.to] = ("live", i, transferred.to)
    for j, binding in enumerate(config.durable_objects.bindings):
        what, i, new_name = fate.get(binding.class_name, ("live", -1, ""))
        if binding.script_name is not None or what == "live":
            continue
        if what == "renamed":
            message = (
                f'class "{binding.class_name}" is renamed to "{new_name}" by migrations[{i}]; '
                f'expected "class_name": "{new_name}" here'
            )
        else:
            message = (
                f'class "{binding.class_name}" is deleted by migrations[{i}] (deleted_classes); '
                "remove this binding, or take the class out of deleted_classes"
            )
        raise source.error(f"durable_objects.bindings[{j}].class_name", message)


def config_error(config: Config, path: str, message: str) -> ConfigError:
    """A ConfigError at ``path`` of a loaded config, with its file and line: for checks made
    after loading, against state the config cannot see (stored objects)."""
    source = _Source(config.config_path, config.project_dir)
    try:
        source.parse()
    except ConfigError:
        pass  # edited meanwhile: the error names the file and key without a line
    return source.error(path, message)


def main_names(config: Config) -> set[str]:
    """The names the worker's main module binds at top level (classes, imports)."""
    return _top_level_names(config.main_path, _display_name(config.main_path, config.project_dir))


def _check_bindings(config: Config, source: _Source) -> None:
    """Every env name is bound once (DO, KV, D1, assets); the assets folder exists."""
    names: dict[str, str] = {}
    entries: list[tuple[str, str]] = [
        (f"durable_objects.bindings[{i}].name", b.name)
        for i, b in enumerate(config.durable_objects.bindings)
    ]
    entries += [
        (f"kv_namespaces[{i}].binding", n.binding) for i, n in enumerate(config.kv_namespaces)
    ]
    entries += [
        (f"d1_databases[{i}].binding", d.binding) for i, d in enumerate(config.d1_databases)
    ]
    if config.assets is not None and config.assets.binding is not None:
        entries.append(("assets.binding", config.assets.binding))
    for path, name in entries:
        if name in names:
            raise source.error(
                path,
                f'binding name "{name}" is already used by {names[name]}; expected unique names',
            )
        names[name] = path
    for i, database in enumerate(config.d1_databases):
        for j, other in enumerate(config.d1_databases[:i]):
            if other.name == database.name:
                raise source.error(
                    f"d1_databases[{i}].database_name",
                    f'database "{database.name}" is already bound by d1_databases[{j}]',
                )
    assets = config.assets
    if assets is not None:
        if assets.directory is None:
            raise source.error("assets", 'expected "directory" (the folder of static files)')
        folder = config.config_path.parent / assets.directory
        if not folder.is_dir():
            raise source.error(
                "assets.directory",
                f'folder "{assets.directory}" not found (expected a folder relative to the '
                "config's folder)",
            )


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
