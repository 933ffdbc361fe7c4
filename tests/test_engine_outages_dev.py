"""Engine outages end to end: a real ``dockyard dev`` whose engine (``DOCKER_HOST``) is a
proxy the test cuts and restores, while the test watches the real engine directly.

While the engine is away, requests get 503 ``engine unavailable`` with an error id (never
the socket's path) and no container is taken for gone; when it is back, each object is
answered by the container it had, none is started twice, and none outlives dev.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp
import pytest

from dockyard.containers.docker import DockerRuntime
from dockyard.containers.runtime import ContainerInfo
from tests.support.devserver import DevServer
from tests.support.engine import wait_until
from tests.support.engine_proxy import open_engine_proxy
from tests.support.projects import make_project

pytestmark = pytest.mark.docker

ERROR_ID = re.compile(r"\(error id [0-9a-f]{8}\)")


async def containers_of(runtime: DockerRuntime, app: str, name: str) -> list[ContainerInfo]:
    return await runtime.list({"dockyard.app": app, "dockyard.object_name": name})


async def hostname(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """The status, and the answering container's hostname (its short id) or the body."""
    async with session.get(url) as response:
        body = await response.text()
    found = re.search(r"^HOSTNAME=(\S+)$", body, re.MULTILINE)
    return response.status, found.group(1) if found else body


@pytest.mark.slow
async def test_an_engine_outage_leaves_one_container_per_object_and_no_orphan(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    project = make_project(tmp_path / "app", {"Web": {}})
    loop = asyncio.get_running_loop()
    async with open_engine_proxy() as proxy, aiohttp.ClientSession() as session:
        # Dev talks to the engine only through the proxy; this test's loop serves it,
        # so dev is started and stopped from a thread.
        dev = DevServer(project.root, env={"DOCKER_HOST": proxy.url})
        await asyncio.to_thread(dev.start)
        try:
            status, first_host = await hostname(session, f"{dev.url}/c/WEB/a/cgi-bin/env")
            assert status == 200, first_host
            [before] = await containers_of(docker_runtime, project.name, "a")
            assert before.id.startswith(first_host)

            await proxy.cut()
            # The exit monitor's wait on the engine broke: the container's state is
            # unknown now, not stopped.
            await asyncio.to_thread(dev.wait_for, r": engine unavailable \(", 10)

            async with session.get(f"{dev.url}/c/WEB/a/cgi-bin/env") as response:
                body = await response.text()
                assert response.status == 503, body
            assert body.startswith("engine unavailable"), body
            assert ERROR_ID.search(body), body
            assert str(proxy.path) not in body and "sock" not in body

            asked = loop.time()
            async with session.get(f"{dev.url}/c/WEB/b/") as response:
                body = await response.text()
                assert response.status == 503, body
            new_object_503 = loop.time() - asked
            assert body.startswith("engine unavailable"), body
            assert ERROR_ID.search(body) and "sock" not in body, body
            assert new_object_503 < 6.0

            # Nothing was stopped or started behind the outage.
            seen = await docker_runtime.inspect(before.id)
            assert seen is not None and seen.running
            assert await containers_of(docker_runtime, project.name, "b") == []

            await proxy.restore()
            restored = time.monotonic()

            async def answered() -> str | None:
                status, host = await hostname(session, f"{dev.url}/c/WEB/a/cgi-bin/env")
                return host if status == 200 else None

            # The exit monitor retries with back-off of at most 5 s (engine_retry_max).
            again = await wait_until(answered, within=15, interval=0.1)
            back_after = time.monotonic() - restored
            assert again == first_host
            assert [c.id for c in await containers_of(docker_runtime, project.name, "a")] == [
                before.id
            ]

            status, b_host = await hostname(session, f"{dev.url}/c/WEB/b/cgi-bin/env")
            assert status == 200, b_host
            [b] = await containers_of(docker_runtime, project.name, "b")
            assert b.id.startswith(b_host)
            print(
                f"engine cut: new object -> 503 in {new_object_503 * 1000:.0f} ms; "
                f"engine restored -> same container answers after {back_after:.2f} s"
            )
        finally:
            await proxy.restore()  # a failed test may have left it cut
            code = await asyncio.to_thread(dev.stop)
            left = await docker_runtime.list(project.labels)
            for info in left:
                await docker_runtime.remove(info.id)
        assert code == 0, dev.output
        # 0 duplicates (checked above), 0 orphans.
        assert left == [], dev.output


@pytest.mark.slow
async def test_a_start_on_a_wedged_engine_answers_503_within_the_engine_timeout(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    project = make_project(tmp_path / "app", {"Web": {}})
    loop = asyncio.get_running_loop()
    async with open_engine_proxy() as proxy, aiohttp.ClientSession() as session:
        dev = DevServer(project.root, env={"DOCKER_HOST": proxy.url})
        await asyncio.to_thread(dev.start)
        try:
            # The engine accepts connections and answers nothing (wedged dockerd).
            proxy.stall()
            asked = loop.time()
            async with session.get(f"{dev.url}/c/WEB/w/") as response:
                body = await response.text()
            took = loop.time() - asked
            print(f"wedged engine: a start answered {response.status} in {took:.2f} s")
            assert response.status == 503, body
            assert body.startswith("engine unavailable") and ERROR_ID.search(body), body
            # ContainerSettings.engine_timeout (5 s), not the 8 s start budget or 30 s.
            assert took < 5 + 2

            # The engine comes back and carries out what was queued (the create dev gave
            # up on): the next request still leaves exactly one container for the object.
            await proxy.restore()
            async with session.get(f"{dev.url}/c/WEB/w/") as response:
                assert response.status == 200, await response.text()
            found = await containers_of(docker_runtime, project.name, "w")
            assert [c.running for c in found] == [True], found
        finally:
            await proxy.restore()
            code = await asyncio.to_thread(dev.stop)
            left = await docker_runtime.list(project.labels)
            for info in left:
                await docker_runtime.remove(info.id)
        assert code == 0, dev.output
        assert left == [], dev.output


@pytest.mark.slow
async def test_an_engine_that_wedges_mid_start_leaves_no_duplicate_or_orphan(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    project = make_project(tmp_path / "app", {"Web": {}})
    async with open_engine_proxy() as proxy, aiohttp.ClientSession() as session:
        dev = DevServer(project.root, env={"DOCKER_HOST": proxy.url})
        await asyncio.to_thread(dev.start)
        try:
            # The container is created; the engine wedges on the call that starts it.
            # Back, the engine carries out the start dev gave up on: a container dev
            # never heard of runs. The next request must use it, not start a second;
            # and one nobody asks for again must not outlive dev.
            for name in ("s", "t"):
                proxy.stall_on(b"/start")
                async with session.get(f"{dev.url}/c/WEB/{name}/") as response:
                    body = await response.text()
                assert response.status == 503, body
                await proxy.restore()

            async def started_behind_our_back() -> bool:
                found = await containers_of(docker_runtime, project.name, "t")
                return [c.running for c in found] == [True]

            await wait_until(started_behind_our_back)
            async with session.get(f"{dev.url}/c/WEB/s/") as response:
                assert response.status == 200, await response.text()
            found = await containers_of(docker_runtime, project.name, "s")
            assert [c.running for c in found] == [True], found
        finally:
            await proxy.restore()
            code = await asyncio.to_thread(dev.stop)
            left = await docker_runtime.list(project.labels)
            for info in left:
                await docker_runtime.remove(info.id)
        assert code == 0, dev.output
        assert left == [], dev.output
