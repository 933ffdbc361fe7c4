"""The start boost, through a real ``dockyard dev`` on the real engine.

A container of the default instance type (``lite``, 1/16 vCPU) starts without a CPU
quota and gets it once its port answers; a class with ``start_boost = False`` has the
quota from the first moment. The containers here listen only once the test lets them
(it creates /tmp/go inside), so "during the start" is a state the test holds open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from dockyard.containers.docker import DockerRuntime
from tests.support.devserver import DevServer
from tests.support.engine import app_name, docker_cli, engine_inspect, wait_until
from tests.support.projects import IMAGES

pytestmark = pytest.mark.docker

# lite: 1/16 vCPU, as the engine records it and as the kernel enforces it (cgroup v1
# quota per 100 ms period, or cgroup v2 "quota period").
LITE_NANO_CPUS = 62_500_000
LITE_QUOTA = {"6250", "6250 100000"}
NO_QUOTA = {"-1", "max 100000"}

WORKER = """
import asyncio

from dockyard import Container, Request, Response, get_container


class Gated(Container):
    default_port = 8080
    sleep_after = "10m"
    # Listens only once /tmp/go exists: the start lasts as long as the test wants.
    entrypoint = ["sh", "-c",
                  "while [ ! -f /tmp/go ]; do sleep 0.02; done; exec httpd -f -p 8080 -h /www"]


    async def boot(self):
        await self.start_and_wait_for_ports()
        return "up"


class Fixed(Gated):
    start_boost = False


class Two(Gated):
    # Port 8080 answers at once, 8081 once /tmp/go exists.
    required_ports = [8080, 8081]
    entrypoint = ["sh", "-c", "httpd -p 8080 -h /www; "
                  "while [ ! -f /tmp/go ]; do sleep 0.02; done; exec httpd -f -p 8081 -h /www"]


class Racing(Container):
    default_port = 8080
    sleep_after = "10m"
    entrypoint = ["httpd", "-f", "-p", "8080", "-h", "/www"]

    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        self.started = asyncio.Event()

    async def on_start(self):
        # Wakes the waiting request within the very loop step that ends the start.
        self.started.set()

    async def race(self):
        async def request_right_after_the_start():
            await self.started.wait()
            response = await self.container_fetch(Request("http://container/"))
            return response.status

        waiting = asyncio.ensure_future(request_right_after_the_start())
        await self.start()
        return str(await waiting)


async def fetch(request, env, ctx):
    # /BINDING/NAME: the container's /; /BINDING/NAME/boot: start_and_wait_for_ports()
    binding, name, *rest = request.path.strip("/").split("/")
    stub = get_container(getattr(env, binding), name)
    if rest == ["boot"]:
        return Response(await stub.boot())
    if rest == ["race"]:
        return Response(await stub.race())
    return await stub.fetch(Request("http://container/", method="GET"))
"""


def write_project(root: Path) -> str:
    name = app_name()
    root.mkdir(parents=True, exist_ok=True)
    (root / "worker.py").write_text(WORKER)
    shutil.copytree(IMAGES / "web", root / "web", dirs_exist_ok=True)
    classes = ["Gated", "Fixed", "Two", "Racing"]
    config = {
        "name": name,
        "main": "worker.py",
        # No instance_type: the default, lite.
        "containers": [{"class_name": c, "image": "./web/Dockerfile"} for c in classes],
        "durable_objects": {"bindings": [{"name": c.upper(), "class_name": c} for c in classes]},
        "migrations": [{"tag": "v1", "new_sqlite_classes": classes}],
    }
    (root / "wrangler.jsonc").write_text(json.dumps(config, indent=2))
    return name


async def started_container(runtime: DockerRuntime, app: str, name: str) -> str:
    async def running() -> str | None:
        infos = await runtime.list({"dockyard.app": app, "dockyard.object_name": name})
        return next((i.id for i in infos if i.running), None)

    return await wait_until(running, within=30, interval=0.01)


async def nano_cpus(container_id: str) -> int:
    return int((await engine_inspect(container_id))["HostConfig"]["NanoCpus"] or 0)


async def kernel_quota(container_id: str) -> str:
    """The CPU quota the kernel applies to the container (cgroup v2 or v1)."""
    out = await docker_cli(
        "exec",
        container_id,
        "sh",
        "-c",
        "cat /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us",
    )
    return out.strip()


async def open_the_gate(container_id: str) -> None:
    await docker_cli("exec", container_id, "touch", "/tmp/go")


@contextlib.asynccontextmanager
async def dev_server(project: Path, app: str, runtime: DockerRuntime) -> AsyncIterator[DevServer]:
    """``dockyard dev`` for one test; whatever ends the test (a hang, a timeout), every
    container of ``app`` is removed afterwards, even when dev had to be killed."""
    dev = DevServer(project).start()
    try:
        yield dev
    finally:
        try:
            dev.stop(timeout=15)
        finally:
            for info in await runtime.list({"dockyard.app": app}):
                await runtime.remove(info.id)


@pytest.mark.slow
async def test_a_boosted_start_runs_unthrottled_and_gets_the_quota_once_its_port_answers(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    app = write_project(tmp_path / "app")
    async with dev_server(tmp_path / "app", app, docker_runtime) as dev:
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(session.get(f"{dev.url}/GATED/boosted"))
            container_id = await started_container(docker_runtime, app, "boosted")
            # Started, its port not answering yet: no quota, in the engine or the kernel.
            assert await nano_cpus(container_id) == 0
            assert await kernel_quota(container_id) in NO_QUOTA
            assert not first.done()
            await open_the_gate(container_id)
            async with await asyncio.wait_for(first, 30) as response:
                assert response.status == 200, await response.text()

            async def limited() -> bool:
                return await nano_cpus(container_id) == LITE_NANO_CPUS

            await wait_until(limited, within=10)
            assert await kernel_quota(container_id) in LITE_QUOTA
            # The quota stays on the running container: a later request changes nothing.
            async with session.get(f"{dev.url}/GATED/boosted") as response:
                assert response.status == 200
            assert await nano_cpus(container_id) == LITE_NANO_CPUS


@pytest.mark.slow
async def test_a_class_without_start_boost_has_its_quota_from_the_start(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    app = write_project(tmp_path / "app")
    async with dev_server(tmp_path / "app", app, docker_runtime) as dev:
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(session.get(f"{dev.url}/FIXED/plain"))
            container_id = await started_container(docker_runtime, app, "plain")
            assert await nano_cpus(container_id) == LITE_NANO_CPUS
            assert await kernel_quota(container_id) in LITE_QUOTA
            assert not first.done()
            await open_the_gate(container_id)
            async with await asyncio.wait_for(first, 30) as response:
                assert response.status == 200, await response.text()
            assert await nano_cpus(container_id) == LITE_NANO_CPUS


@pytest.mark.slow
async def test_start_and_wait_for_ports_is_boosted_until_every_port_answers(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    app = write_project(tmp_path / "app")
    async with dev_server(tmp_path / "app", app, docker_runtime) as dev:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            boot = asyncio.create_task(session.get(f"{dev.url}/TWO/two/boot"))
            container_id = await started_container(docker_runtime, app, "two")
            # Port 8080 answers through Dockyard (so Dockyard has seen it up); 8081 does not
            # yet, and start_and_wait_for_ports() waits for both: still no quota.
            async with session.get(f"{dev.url}/TWO/two") as response:
                assert response.status == 200, await response.text()
            assert not boot.done()
            assert await nano_cpus(container_id) == 0
            await open_the_gate(container_id)
            async with await asyncio.wait_for(boot, 30) as response:
                assert response.status == 200, await response.text()
                assert await response.text() == "up"

            async def limited() -> bool:
                return await nano_cpus(container_id) == LITE_NANO_CPUS

            await wait_until(limited, within=10)
            assert await kernel_quota(container_id) in LITE_QUOTA


@pytest.mark.slow
async def test_a_request_made_in_the_step_that_ends_a_start_is_answered(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    # on_start wakes a request; it runs after the start's last step and before anything
    # scheduled by the start's end. It once found the finished start still "under way",
    # awaited it without yielding and looped for ever: dev froze, nothing answered.
    app = write_project(tmp_path / "app")
    async with dev_server(tmp_path / "app", app, docker_runtime) as dev:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            async with session.get(f"{dev.url}/RACING/racer/race") as response:
                assert response.status == 200, await response.text()
                assert await response.text() == "200"


@pytest.mark.slow
async def test_a_container_adopted_during_its_boost_gets_its_quota(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    app = write_project(tmp_path / "app")
    try:
        dev = DevServer(tmp_path / "app").start()
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(session.get(f"{dev.url}/GATED/adopted"))
            container_id = await started_container(docker_runtime, app, "adopted")
            assert await nano_cpus(container_id) == 0
            # Dockyard dies mid-start; the container runs on, boosted.
            dev.kill()
            with contextlib.suppress(aiohttp.ClientError):
                (await first).close()
        with DevServer(tmp_path / "app"):
            # The next run adopts it: it must not run without its quota for ever.

            async def limited() -> bool:
                return await nano_cpus(container_id) == LITE_NANO_CPUS

            await wait_until(limited, within=10)
    finally:
        for info in await docker_runtime.list({"dockyard.app": app}):
            await docker_runtime.remove(info.id)
