"""Durable Objects behind `dockyard dev`: the real gateway, real processes, real files."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from pathlib import Path

import aiohttp

from tests.support.devserver import DevServer
from tests.support.engine import wait_until

WORKER = """
import time

from dockyard import DurableObject, Response


class Counter(DurableObject):
    async def increment(self):
        n = await self.ctx.storage.get("n") or 0
        await self.ctx.storage.put("n", n + 1)
        return n + 1

    async def value(self):
        return await self.ctx.storage.get("n") or 0

    async def arm(self, delay_ms):
        await self.ctx.storage.set_alarm(time.time() * 1000 + delay_ms)

    async def alarm(self, info):
        await self.ctx.storage.put("fired", await self.fired() + 1)

    async def fired(self):
        return await self.ctx.storage.get("fired") or 0

    async def alarm_at(self):
        return await self.ctx.storage.get_alarm()


async def fetch(request, env, ctx):
    _, op, name = request.path.split("/")
    args = await request.json() if request.method == "POST" else []
    return Response.json(await getattr(env.COUNTER.get_by_name(name), op)(*args))
"""


def make_project(root: Path) -> Path:
    (root / "worker.py").write_text(textwrap.dedent(WORKER))
    config = {
        "name": "objects-probe",
        "main": "worker.py",
        "durable_objects": {"bindings": [{"name": "COUNTER", "class_name": "Counter"}]},
        "migrations": [{"tag": "v1", "new_sqlite_classes": ["Counter"]}],
    }
    (root / "wrangler.jsonc").write_text(json.dumps(config))
    return root


async def call(session: aiohttp.ClientSession, url: str, *args: object) -> object:
    async with session.post(url, json=list(args)) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_concurrent_increments_through_the_gateway(tmp_path: Path) -> None:
    with DevServer(make_project(tmp_path)) as dev:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(call(session, dev.url + "/increment/c") for _ in range(300))
            )
            assert sorted(results) == list(range(1, 301))  # type: ignore[type-var]
            assert await call(session, dev.url + "/value/c") == 300


async def test_sigkill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    dev = DevServer(project).start()
    acknowledged = 0
    async with aiohttp.ClientSession() as session:

        async def write_forever() -> None:
            nonlocal acknowledged
            while True:
                acknowledged = await call(session, dev.url + "/increment/k")  # type: ignore[assignment]

        async def enough_acknowledged() -> bool:
            return acknowledged >= 200

        writer = asyncio.create_task(write_forever())
        await wait_until(enough_acknowledged, within=30)
        dev.kill()
        try:
            await writer
        except aiohttp.ClientError:
            pass  # the connection died with the process, as it should
        assert acknowledged >= 200
        dev = DevServer(project).start()
        try:
            assert await call(session, dev.url + "/value/k") >= acknowledged  # type: ignore[operator]
        finally:
            dev.stop()


async def test_alarm_due_during_downtime_fires_once_after_restart(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    delay = 3.0
    async with aiohttp.ClientSession() as session:
        with DevServer(project) as dev:
            due = time.time() + delay
            await call(session, dev.url + "/arm/a", delay * 1000)
            assert await call(session, dev.url + "/fired/a") == 0
        # The premise: dockyard dev was down before the alarm fell due ...
        assert time.time() < due, "dockyard dev took longer to stop than the alarm's delay"

        async def fell_due() -> bool:
            return time.time() > due

        # ... and stays down until it has.
        await wait_until(fell_due, within=delay + 1)
        with DevServer(project) as dev:

            async def fired() -> object:
                return await call(session, dev.url + "/fired/a")

            assert await wait_until(fired, within=10) == 1

            async def cleared() -> bool:
                return await call(session, dev.url + "/alarm_at/a") is None

            # Nothing is left to fire a second time.
            await wait_until(cleared, within=5)
            assert await fired() == 1
