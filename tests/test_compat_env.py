"""`env.<name>` environments of the wrangler config, with Cloudflare's inheritance rules."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dockyard.config import load_config
from dockyard.errors import ConfigError
from tests.support.compat import request
from tests.support.devserver import DevServer

WORKER = """
from workers import Response, WorkerEntrypoint

class Default(WorkerEntrypoint):
    async def fetch(self, request):
        kv = getattr(self.env, "CACHE", None)
        return Response(f"{self.env.STAGE} {self.env.TOKEN} {kv is not None}")
"""

CONFIG = """\
{
  "name": "shop",
  "main": "src/entry.py",
  "compatibility_date": "2026-11-01",
  "triggers": {"crons": ["0 * * * *"]},
  "vars": {"STAGE": "production"},
  "kv_namespaces": [{"binding": "CACHE", "id": "prod"}],
  "env": {
    "staging": {
      "vars": {"STAGE": "staging"},
      "migrations": []
    },
    "qa": {
      "name": "shop-qa-custom",
      "vars": {"STAGE": "qa"},
      "kv_namespaces": [{"binding": "CACHE", "id": "qa"}],
      "d1_databases": [{"binding": "bad name"}]
    }
  }
}
"""


def project(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "entry.py").write_text(textwrap.dedent(WORKER))
    (root / "wrangler.jsonc").write_text(CONFIG)
    (root / ".dev.vars").write_text("TOKEN=top\n")
    (root / ".dev.vars.staging").write_text("TOKEN=staging-secret\n")
    return root


def test_top_level_is_the_default_environment(tmp_path: Path) -> None:
    config = load_config(project(tmp_path), env=None)
    assert (config.name, config.vars, config.environment) == ("shop", {"STAGE": "production"}, None)
    assert [ns.id for ns in config.kv_namespaces] == ["prod"]
    assert config.secrets == {"TOKEN": "top"}


def test_an_environment_inherits_what_cloudflare_inherits(tmp_path: Path) -> None:
    config = load_config(project(tmp_path), env="staging")
    assert config.environment == "staging"
    # Inherited: main, compatibility_date, triggers; the name gets the env suffix.
    assert (config.name, config.main, config.compatibility_date) == (
        "shop-staging",
        "src/entry.py",
        "2026-11-01",
    )
    assert config.triggers.crons == ["0 * * * *"]
    # Not inherited: bindings and vars come only from the environment.
    assert config.vars == {"STAGE": "staging"}
    assert config.kv_namespaces == []
    assert config.secrets == {"TOKEN": "staging-secret"}  # .dev.vars.staging
    assert config.warnings == [
        'wrangler.jsonc:7: "kv_namespaces" exists at the top level but not in "env.staging": '
        "it is not inherited, so this environment has none",
        'wrangler.jsonc:11: "migrations" is only read at the top level (ignored here)',
    ]


def test_errors_point_into_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(project(tmp_path), env="qa")
    assert str(caught.value).startswith(
        "wrangler.jsonc:17: env.qa.d1_databases[0].binding: expected a valid Python identifier"
    )
    with pytest.raises(ConfigError) as unknown:
        load_config(project(tmp_path / "again"), env="prod")
    assert str(unknown.value) == 'wrangler.jsonc:8: env: no environment "prod" (known: qa, staging)'


async def test_dev_serves_the_environment_named_by_cloudflare_env(tmp_path: Path) -> None:
    root = project(tmp_path)
    with DevServer(root, env={"CLOUDFLARE_ENV": "staging"}) as server:
        assert (await request(server.url + "/"))[:3] == (
            200,
            "text/plain;charset=UTF-8",
            b"staging staging-secret False",
        )
        assert "Ready shop-staging on" in server.output


async def test_dev_env_flag(tmp_path: Path) -> None:
    with DevServer(project(tmp_path), "--env", "staging") as server:
        assert (await request(server.url + "/"))[2] == b"staging staging-secret False"
