"""``App.reload_version``: a node switches a running app to another deployed version in
place; a version that fails to import leaves the previous one serving, whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dockyard.app import App
from dockyard.errors import WorkerError
from dockyard.http import Request
from dockyard.settings import Settings

WORKER = """
from dockyard import Response


async def fetch(request, env, ctx):
    return Response(f"{VERSION} {env.GREETING} {env.TOKEN}")

VERSION = "@VERSION@"
"""


def bundle(root: Path, version: str, *, greeting: str, broken: bool = False) -> Path:
    root.mkdir(parents=True)
    source = WORKER.replace("@VERSION@", version) + ("\nthis is not python\n" if broken else "")
    (root / "worker.py").write_text(source)
    config = {"name": "reloaded", "main": "worker.py", "vars": {"GREETING": greeting}}
    (root / "wrangler.jsonc").write_text(json.dumps(config))
    return root


async def answer(app: App) -> str:
    response = await app.handle(Request("http://app/"))
    return await response.text()


async def test_reload_version_switches_code_vars_and_secrets_or_keeps_the_old_whole(
    tmp_path: Path,
) -> None:
    v1 = bundle(tmp_path / "v1", "v1", greeting="hello")
    app = App(v1, settings=Settings(state_dir=tmp_path / "state"), secrets={"TOKEN": "s1"})
    await app.start()
    try:
        assert await answer(app) == "v1 hello s1"

        v2 = bundle(tmp_path / "v2", "v2", greeting="bonjour")
        assert await app.reload_version(
            v2, image_overrides={}, vars={"GREETING": "bonjour"}, secrets={"TOKEN": "s2"}
        )
        assert await answer(app) == "v2 bonjour s2"

        v3 = bundle(tmp_path / "v3", "v3", greeting="hola", broken=True)
        with pytest.raises(WorkerError):
            await app.reload_version(
                v3, image_overrides={}, vars={"GREETING": "hola"}, secrets={"TOKEN": "s3"}
            )
        # The previous version serves on, and is still what the app says it runs.
        assert await answer(app) == "v2 bonjour s2"
        assert app.project_dir == v2.resolve()
        assert app.config.vars == {"GREETING": "bonjour"}

        # A later good version still loads (the failed one left nothing behind).
        v4 = bundle(tmp_path / "v4", "v4", greeting="hej")
        assert await app.reload_version(
            v4, image_overrides={}, vars={"GREETING": "hej"}, secrets={"TOKEN": "s4"}
        )
        assert await answer(app) == "v4 hej s4"
    finally:
        await app.stop()
