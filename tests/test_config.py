"""Loading wrangler configs: the happy paths, and that every mistake names file, line and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dockyard.config import INSTANCE_TYPES, InstanceSpec, find_config, load_config
from dockyard.errors import ConfigError

MAIN_PY = """\
from dockyard import Container, WorkerEntrypoint


class NodeContainer(Container):
    default_port = 8080


class Helper(Container):
    pass


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return await self.env.CONTAINER.get_by_name("x").fetch(request)
"""

# The seed tutorial's wrangler.jsonc, with a Python main, comments and trailing commas.
SEED_JSONC = """\
{
  "$schema": "node_modules/wrangler/config-schema.json",
  "name": "containers-hello-world",
  "main": "src/main.py",
  "compatibility_date": "2025-05-23",
  "compatibility_flags": ["python_workers"], // Python Workers
  "observability": {
    "enabled": true,
  },
  /* one container, built from the local Dockerfile */
  "containers": [
    {
      "class_name": "NodeContainer",
      "image": "./Dockerfile",
      "max_instances": 1,
      "name": "hello-world-container",
    },
  ],
  "durable_objects": {
    "bindings": [
      {
        "class_name": "NodeContainer",
        "name": "CONTAINER",
      },
    ],
  },
  "migrations": [
    {
      "new_sqlite_classes": ["NodeContainer"],
      "tag": "v1",
    },
  ],
  "vars": {"GREETING": "hello", "RETRIES": 3},
}
"""

SEED_TOML = """\
name = "containers-hello-world"
main = "src/main.py"
compatibility_date = "2025-05-23"

[vars]
GREETING = "hello"

[[containers]]
class_name = "NodeContainer"
image = "./Dockerfile"
max_instances = 3
instance_type = "standard-1"

[[durable_objects.bindings]]
name = "CONTAINER"
class_name = "NodeContainer"

[[migrations]]
tag = "v1"
new_sqlite_classes = ["NodeContainer"]

[dev]
port = 9000
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text(MAIN_PY)
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    return tmp_path


def write_jsonc(project: Path, text: str = SEED_JSONC) -> Path:
    path = project / "wrangler.jsonc"
    path.write_text(text)
    return path


def line_of(text: str, needle: str | tuple[str, int]) -> int:
    needle, offset = needle if isinstance(needle, tuple) else (needle, 0)
    lines = enumerate(text.splitlines(), start=1)
    return next(i for i, line in lines if needle in line) + offset


def load_error(project: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(project)
    return str(info.value)


# -- happy paths ----------------------------------------------------------------------------


def test_seed_jsonc_loads(project: Path) -> None:
    write_jsonc(project)
    config = load_config(project)

    assert config.name == "containers-hello-world"
    assert config.main_path == project.resolve() / "src" / "main.py"
    assert config.compatibility_date == "2025-05-23"
    assert config.compatibility_flags == ["python_workers"]
    assert config.observability.enabled is True
    assert config.vars == {"GREETING": "hello", "RETRIES": 3}
    assert config.durable_objects.bindings[0].name == "CONTAINER"
    assert config.migrations[0].new_sqlite_classes == ["NodeContainer"]
    assert config.warnings == []  # "$schema" is expected, not unknown

    container = config.container_for("NodeContainer")
    assert container is not None
    assert container.name == "hello-world-container"
    assert container.max_instances == 1
    assert container.is_dockerfile
    assert container.dockerfile_path == project.resolve() / "Dockerfile"
    assert container.build_context_path == project.resolve()
    assert config.container_for("Nope") is None


def test_json_loads(project: Path) -> None:
    data = {
        "name": "app",
        "main": "src/main.py",
        "containers": [{"class_name": "NodeContainer", "image": "registry.local/app:1"}],
        "durable_objects": {"bindings": [{"name": "APP", "class_name": "NodeContainer"}]},
        "migrations": [{"tag": "v1", "new_sqlite_classes": ["NodeContainer"]}],
    }
    (project / "wrangler.json").write_text(json.dumps(data, indent=2))
    config = load_config(project)

    assert config.config_path.name == "wrangler.json"
    container = config.containers[0]
    assert not container.is_dockerfile
    assert container.dockerfile_path is None
    assert container.build_context_path is None


def test_toml_loads(project: Path) -> None:
    (project / "wrangler.toml").write_text(SEED_TOML)
    config = load_config(project)

    assert config.vars == {"GREETING": "hello"}
    assert config.containers[0].max_instances == 3
    assert config.containers[0].resources == INSTANCE_TYPES["standard-1"]
    assert config.durable_objects.bindings[0].class_name == "NodeContainer"
    assert config.dev.port == 9000


def test_defaults(project: Path) -> None:
    write_jsonc(
        project,
        """{
          "name": "app", "main": "src/main.py",
          "containers": [{"class_name": "NodeContainer", "image": "./Dockerfile"}],
          "durable_objects": {"bindings": [{"name": "C", "class_name": "NodeContainer"}]},
          "migrations": [{"tag": "v1", "new_sqlite_classes": ["NodeContainer"]}],
        }""",
    )
    config = load_config(project)
    container = config.containers[0]

    assert container.max_instances == 20
    assert container.instance_type == "lite"
    assert container.resources == InstanceSpec(vcpu=0.0625, memory_mib=256, disk_mb=2000)
    assert container.name == "app-nodecontainer"
    assert container.rollout_active_grace_period == 0
    assert config.dev.ip == "127.0.0.1"
    assert config.dev.port == 8787
    assert config.observability.enabled is False
    assert config.vars == {} and config.secrets == {}


def test_custom_instance_type_fills_missing_fields(project: Path) -> None:
    write_jsonc(project, SEED_JSONC.replace('"max_instances": 1,', '"instance_type": {"vcpu": 2},'))
    resources = load_config(project).containers[0].resources
    assert resources == InstanceSpec(vcpu=2, memory_mib=256, disk_mb=2000)


def test_instance_type_aliases() -> None:
    assert INSTANCE_TYPES["dev"] == INSTANCE_TYPES["lite"]
    assert INSTANCE_TYPES["standard"] == INSTANCE_TYPES["standard-1"]
    assert INSTANCE_TYPES["standard-4"] == InstanceSpec(vcpu=4, memory_mib=12288, disk_mb=20000)


def test_image_build_context(project: Path) -> None:
    (project / "docker").mkdir()
    (project / "docker" / "Dockerfile").write_text("FROM scratch\n")
    text = SEED_JSONC.replace(
        '"image": "./Dockerfile",', '"image": "docker/Dockerfile", "image_build_context": ".",'
    )
    write_jsonc(project, text)
    container = load_config(project).containers[0]
    assert container.dockerfile_path == project.resolve() / "docker" / "Dockerfile"
    assert container.build_context_path == project.resolve()


# -- finding the file -----------------------------------------------------------------------


def test_file_name_precedence(project: Path) -> None:
    for name in ("wrangler.toml", "wrangler.json", "wrangler.jsonc"):
        (project / name).write_text("{}")
    assert find_config(project).name == "wrangler.jsonc"
    (project / "wrangler.jsonc").unlink()
    assert find_config(project).name == "wrangler.json"
    (project / "wrangler.json").unlink()
    assert find_config(project).name == "wrangler.toml"


def test_explicit_config_overrides(project: Path) -> None:
    write_jsonc(project)
    (project / "staging.toml").write_text(SEED_TOML.replace("port = 9000", "port = 9001"))
    assert find_config(project, Path("staging.toml")) == project / "staging.toml"
    assert load_config(project, "staging.toml").dev.port == 9001


def test_no_config_names_folder_and_all_three_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        find_config(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    for name in ("wrangler.jsonc", "wrangler.json", "wrangler.toml"):
        assert name in message


def test_explicit_config_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.jsonc"):
        find_config(tmp_path, Path("nope.jsonc"))


# -- .dev.vars --------------------------------------------------------------------------------


def test_dev_vars(project: Path) -> None:
    write_jsonc(project)
    (project / ".dev.vars").write_text(
        "# secrets for local dev\n\nAPI_KEY=abc123\nQUOTED=\"hello world\"\nSINGLE='x=y'\n"
        "EMPTY=\n  SPACED = value  \n"
    )
    assert load_config(project).secrets == {
        "API_KEY": "abc123",
        "QUOTED": "hello world",
        "SINGLE": "x=y",
        "EMPTY": "",
        "SPACED": "value",
    }


@pytest.mark.parametrize("bad", ["just some words", "1KEY=value", "=value", "MY-KEY=1"])
def test_dev_vars_bad_line(project: Path, bad: str) -> None:
    write_jsonc(project)
    (project / ".dev.vars").write_text(f"# comment\nGOOD=1\n{bad}\n")
    message = load_error(project)
    assert message.startswith(".dev.vars:3: ")
    assert "expected KEY=VALUE" in message
    assert json.dumps(bad) in message


# -- warnings ---------------------------------------------------------------------------------


def test_unknown_keys_are_warnings_with_paths_and_lines(project: Path) -> None:
    text = SEED_JSONC.replace(
        '"name": "containers-hello-world",', '"contaners": [],\n  "name": "a",'
    )
    text = text.replace('"max_instances": 1,', '"max_instance": 1,')
    text = text.replace('"tag": "v1",', '"tag": "v1", "new_sqlite_class": [],')
    write_jsonc(project, text)
    warnings = load_config(project).warnings

    assert f'wrangler.jsonc:{line_of(text, "contaners")}: unknown key "contaners" (ignored)' in (
        warnings
    )
    line = line_of(text, "max_instance")
    assert f'wrangler.jsonc:{line}: unknown key "containers[0].max_instance" (ignored)' in warnings
    line = line_of(text, 'new_sqlite_class"')
    assert f'wrangler.jsonc:{line}: unknown key "migrations[0].new_sqlite_class" (ignored)' in (
        warnings
    )
    assert len(warnings) == 3


def test_unsupported_cloudflare_keys_are_warnings(project: Path) -> None:
    text = SEED_JSONC.replace(
        '"max_instances": 1,', '"max_instances": 1, "scheduling_policy": "moon",'
    )
    write_jsonc(project, text)
    [warning] = load_config(project).warnings
    line = line_of(text, "scheduling_policy")
    assert warning.startswith(f"wrangler.jsonc:{line}: ")
    assert '"containers[0].scheduling_policy" is not supported' in warning


def test_container_missing_from_new_sqlite_classes_warns(project: Path) -> None:
    text = SEED_JSONC.replace('"new_sqlite_classes": ["NodeContainer"]', '"new_classes": ["X"]')
    write_jsonc(project, text)
    [warning] = load_config(project).warnings
    line = line_of(text, '"class_name": "NodeContainer"')
    assert warning.startswith(f"wrangler.jsonc:{line}: ")
    assert "containers[0].class_name" in warning
    assert "new_sqlite_classes" in warning


# -- errors: each names the file, the line, the key path and what was expected -----------

BINDING = '"class_name": "NodeContainer",\n        "name": "CONTAINER",\n      },'
SECOND_BINDING = BINDING + '\n      {"class_name": "{cls}", "name": "{name}"},'

JSONC_ERRORS = [
    # (id, old, new, line needle, key path, expectation); a missing key is reported at the
    # line of its enclosing object, given as (needle, lines after it).
    (
        "syntax error",
        '"compatibility_date": "2025-05-23",',
        '"compatibility_date": "2025-05-23" "oops",',
        '"oops"',
        None,
        "invalid JSONC",
    ),
    ("name wrong type", '"name": "containers-hello-world"', '"name": 42', '"name": 42', "name",
     "expected a string, got 42"),
    ("name bad chars", '"name": "containers-hello-world"', '"name": "Hello World"',
     '"Hello World"', "name", "expected lowercase letters, digits and dashes"),
    ("main missing", '"main": "src/main.py",', "", "{", "main", "required key is missing"),
    ("main not found", '"main": "src/main.py"', '"main": "src/nope.py"', '"main"', "main",
     'file "src/nope.py" not found'),
    ("main not .py", '"main": "src/main.py"', '"main": "src/index.ts"', '"main"', "main",
     'expected a path to a Python file ending in ".py", got "src/index.ts"'),
    ("bad date", '"2025-05-23"', '"23/05/2025"', "compatibility_date", "compatibility_date",
     'expected a date as YYYY-MM-DD, got "23/05/2025"'),
    ("container without binding", '"class_name": "NodeContainer",\n      "image"',
     '"class_name": "Helper",\n      "image"', '"class_name": "Helper"',
     "containers[0].class_name", 'no durable_objects binding has class_name "Helper"'),
    ("unknown instance_type", '"max_instances": 1,', '"instance_type": "huge",', '"huge"',
     "containers[0].instance_type", "expected one of lite, dev, basic, standard-1"),
    ("instance_type wrong type", '"max_instances": 1,', '"instance_type": 4,',
     '"instance_type"', "containers[0].instance_type", "or an object with vcpu, memory_mib"),
    ("custom instance_type vcpu", '"max_instances": 1,', '"instance_type": {"vcpu": 0},',
     '"instance_type"', "containers[0].instance_type.vcpu", "expected a number > 0, got 0"),
    ("custom instance_type memory", '"max_instances": 1,',
     '"instance_type": {\n        "memory_mib": "lots",\n      },', '"memory_mib"',
     "containers[0].instance_type.memory_mib", 'expected an integer >= 1, got "lots"'),
    ("negative max_instances", '"max_instances": 1', '"max_instances": -1', "max_instances",
     "containers[0].max_instances", "expected an integer >= 0, got -1"),
    ("max_instances as a word", '"max_instances": 1', '"max_instances": "ten"',
     "max_instances", "containers[0].max_instances", 'expected an integer >= 0, got "ten"'),
    ("image missing", '"image": "./Dockerfile",', "", ('"containers": [', 1),
     "containers[0].image", "required key is missing"),
    ("Dockerfile not found", '"image": "./Dockerfile"', '"image": "./app/Dockerfile"',
     '"image"', "containers[0].image", 'Dockerfile "./app/Dockerfile" not found'),
    ("bad rollout step", '"max_instances": 1,', '"rollout_step_percentage": [50, 20],',
     "rollout_step_percentage", "containers[0].rollout_step_percentage",
     "expected one of 5, 10, 20, 25, 50, 100 or an ascending list"),
    ("containers not a list", '"containers": [', '"containers": {"x": [', '"containers"',
     "containers", "expected a list, got"),
    ("duplicate binding names", BINDING,
     SECOND_BINDING.replace("{cls}", "Helper").replace("{name}", "CONTAINER"), '"Helper"',
     "durable_objects.bindings[1].name", 'duplicate binding name "CONTAINER"'),
    ("bound class not in main", BINDING,
     SECOND_BINDING.replace("{cls}", "Ghost").replace("{name}", "GHOST"), '"Ghost"',
     "durable_objects.bindings[1].class_name", 'class "Ghost" is not defined in src/main.py'),
    ("invalid binding name", '"name": "CONTAINER"', '"name": "MY-CONTAINER"', "MY-CONTAINER",
     "durable_objects.bindings[0].name", "expected a valid Python identifier"),
    ("binding name missing", '"name": "CONTAINER",', "", ('"bindings": [', 1),
     "durable_objects.bindings[0].name", "required key is missing"),
    ("bad dev.port", '"vars":', '"dev": {"port": 70000},\n  "vars":', '"port"', "dev.port",
     "expected an integer from 1 to 65535, got 70000"),
    ("dev.port as a string", '"vars":', '"dev": {\n    "port": "8787",\n  },\n  "vars":',
     '"port"', "dev.port", 'expected an integer from 1 to 65535, got "8787"'),
    ("vars not an object", '"vars": {"GREETING": "hello", "RETRIES": 3}',
     '"vars": ["GREETING"]', '"vars"', "vars", 'expected an object, got ["GREETING"]'),
    ("observability.enabled not a bool", '"enabled": true', '"enabled": "yes"', '"yes"',
     "observability.enabled", 'expected true or false, got "yes"'),
    ("migrations not a list", '"migrations": [', '"migrations": {"m": [', '"migrations"',
     "migrations", "expected a list"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "needle", "path", "expected"),
    [case[1:] for case in JSONC_ERRORS],
    ids=[case[0] for case in JSONC_ERRORS],
)
def test_jsonc_errors(
    project: Path,
    old: str,
    new: str,
    needle: str | tuple[str, int],
    path: str | None,
    expected: str,
) -> None:
    assert old in SEED_JSONC
    text = SEED_JSONC.replace(old, new, 1)
    if path == "containers":
        text = text.replace('    },\n  ],\n  "durable', '    }]},\n  "durable')
    if path == "migrations":
        text = text.replace('    },\n  ],\n  "vars', '    }]},\n  "vars')
    write_jsonc(project, text)

    message = load_error(project)
    prefix = f"wrangler.jsonc:{line_of(text, needle)}: "
    assert message.startswith(prefix + (f"{path}: " if path else "")), message
    assert expected in message


def test_all_validation_errors_are_listed(project: Path) -> None:
    text = SEED_JSONC.replace('"name": "containers-hello-world"', '"name": 42')
    text = text.replace('"max_instances": 1', '"max_instances": "ten"')
    write_jsonc(project, text)
    first, second = load_error(project).splitlines()
    assert first == f"wrangler.jsonc:{line_of(text, '42')}: name: expected a string, got 42"
    assert second == (
        f"wrangler.jsonc:{line_of(text, 'ten')}: containers[0].max_instances: "
        'expected an integer >= 0, got "ten"'
    )


def test_duplicate_container_class(project: Path) -> None:
    text = SEED_JSONC.replace(
        '"name": "hello-world-container",\n    },',
        '"name": "hello-world-container",\n    },\n    {"class_name": "NodeContainer", '
        '"image": "registry.local/x:1"},',
    )
    write_jsonc(project, text)
    message = load_error(project)
    line = line_of(text, '{"class_name": "NodeContainer", "image"')
    assert message.startswith(f"wrangler.jsonc:{line}: containers[1].class_name: ")
    assert 'duplicate container class_name "NodeContainer"' in message


def test_top_level_not_an_object(project: Path) -> None:
    write_jsonc(project, "// nothing here\n[1, 2]\n")
    message = load_error(project)
    assert message.startswith("wrangler.jsonc:2: ")
    assert "expected an object at the top level, got [1, 2]" in message


def test_main_syntax_error_names_main_and_line(project: Path) -> None:
    write_jsonc(project)
    (project / "src" / "main.py").write_text("class NodeContainer:\n    pass\n\ndef broken(:\n")
    message = load_error(project)
    assert message.startswith("src/main.py:4: ")
    assert "invalid Python syntax" in message


def test_class_imported_into_main_counts_as_defined(project: Path) -> None:
    write_jsonc(project)
    (project / "src" / "main.py").write_text("from .containers import NodeContainer\n")
    assert load_config(project).durable_objects.bindings[0].class_name == "NodeContainer"


def test_binding_with_script_name_needs_no_class_in_main(project: Path) -> None:
    write_jsonc(
        project,
        SEED_JSONC.replace(BINDING, SECOND_BINDING.replace("{cls}", "Elsewhere").replace(
            "{name}", "OTHER"
        ).replace('"OTHER"}', '"OTHER", "script_name": "other-worker"}')),
    )  # fmt: skip
    assert load_config(project).durable_objects.bindings[1].script_name == "other-worker"


def test_toml_syntax_error(project: Path) -> None:
    text = SEED_TOML.replace("max_instances = 3", "max_instances = = 3")
    (project / "wrangler.toml").write_text(text)
    message = load_error(project)
    assert message.startswith(f"wrangler.toml:{line_of(text, '= = 3')}: ")
    assert "invalid TOML" in message


@pytest.mark.parametrize(
    ("old", "new", "needle", "path", "expected"),
    [
        ("max_instances = 3", 'max_instances = "ten"', "max_instances",
         "containers[0].max_instances", 'expected an integer >= 0, got "ten"'),
        ('name = "CONTAINER"', 'name = "MY-CONTAINER"', "MY-CONTAINER",
         "durable_objects.bindings[0].name", "expected a valid Python identifier"),
        ("port = 9000", "port = 0", "port = 0", "dev.port", "expected an integer from 1 to 65535"),
        ('image = "./Dockerfile"\n', "", "[[containers]]", "containers[0].image",
         "required key is missing"),
        ('instance_type = "standard-1"', "[containers.instance_type]\nvcpu = -1", "vcpu",
         "containers[0].instance_type.vcpu", "expected a number > 0, got -1"),
    ],
    ids=["max_instances", "binding name", "dev.port", "image missing", "custom vcpu"],
)  # fmt: skip
def test_toml_errors(
    project: Path, old: str, new: str, needle: str, path: str, expected: str
) -> None:
    text = SEED_TOML.replace(old, new)
    (project / "wrangler.toml").write_text(text)
    message = load_error(project)
    assert message.startswith(f"wrangler.toml:{line_of(text, needle)}: {path}: "), message
    assert expected in message
