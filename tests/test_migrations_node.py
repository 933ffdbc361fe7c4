"""Class migrations on a node: a deploy's new app process applies them before it serves,
and a migration that would be refused fails the deploy while the previous version serves
on (real child processes, unix sockets and SQLite files)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dockyard.errors import DockyardError
from dockyard.node.appproc import AppEndpoint, AppProcesses, Launch

WORKER = """
from dockyard import DurableObject, Response


class {name}(DurableObject):
    async def increment(self):
        n = await self.ctx.storage.get("n") or 0
        await self.ctx.storage.put("n", n + 1)
        return n + 1


async def fetch(request, env, ctx):
    return Response.json(await env.COUNTER.get_by_name("c").increment())
"""

pytestmark = pytest.mark.slow


@pytest.fixture
def base() -> Iterator[Path]:
    # Short: unix socket paths are limited to 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="dymig", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def processes() -> AsyncIterator[AppProcesses]:
    procs = AppProcesses(on_exit=lambda app, code: None)
    try:
        yield procs
    finally:
        await procs.aclose()


def launch(base: Path, version: int, class_name: str, migrations: list[dict[str, Any]]) -> Launch:
    bundle = base / "bundles" / f"v{version}"
    bundle.mkdir(parents=True)
    (bundle / "worker.py").write_text(WORKER.format(name=class_name))
    config = {
        "name": "counting",
        "main": "worker.py",
        "durable_objects": {"bindings": [{"name": "COUNTER", "class_name": class_name}]},
        "migrations": migrations,
    }
    (bundle / "wrangler.jsonc").write_text(json.dumps(config))
    return Launch(
        app="counting",
        version=version,
        owner="test-migrations-node",
        bundle_dir=str(bundle),
        state_dir=str(base / "apps" / "counting" / "state"),
        run_dir=str(base / "run" / "counting"),
        vars={},
        secrets={},
        uid=None,
        python=sys.executable,
        settings={"drain_grace": 2.0, "stop_grace": 1.0},
    )


async def count(endpoint: AppEndpoint | None) -> int:
    assert endpoint is not None, "the app does not serve"
    connector = aiohttp.UnixConnector(path=str(endpoint.http))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get("http://app/", timeout=aiohttp.ClientTimeout(total=20)) as r:
            assert r.status == 200, await r.text()
            return int(await r.text())


async def test_a_deploy_applies_a_rename_and_refuses_an_orphaning_one(
    base: Path, processes: AppProcesses
) -> None:
    v1: list[dict[str, Any]] = [{"tag": "v1", "new_sqlite_classes": ["Counter"]}]
    await processes.ensure(launch(base, 1, "Counter", v1))
    assert await count(processes.endpoint("counting")) == 1
    assert await count(processes.endpoint("counting")) == 2

    v2 = [*v1, {"tag": "v2", "renamed_classes": [{"from": "Counter", "to": "Tally"}]}]
    await processes.ensure(launch(base, 2, "Tally", v2))
    assert await count(processes.endpoint("counting")) == 3

    # Tally renamed in code without a migration: refused before the running one stops.
    with pytest.raises(DockyardError, match=r'class "Tally" has 1 stored object in '):
        await processes.ensure(launch(base, 3, "Score", v2))
    assert await count(processes.endpoint("counting")) == 4
