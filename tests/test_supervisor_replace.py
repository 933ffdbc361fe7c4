"""A rollout's replacement of one object's container, on the real engine: requests in
flight finish on the old container, requests that arrive meanwhile wait and go to the new
one, nothing fails, and the new container runs the class's new image."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aiohttp
import pytest

from dockyard.app import App
from dockyard.containers.docker import DockerRuntime
from dockyard.gateway.server import Gateway
from dockyard.settings import ContainerSettings, Settings
from tests.support.engine import wait_until
from tests.test_supervisor import write_project

pytestmark = [pytest.mark.docker, pytest.mark.slow]


async def test_replace_drains_then_restarts_on_the_new_image_without_failures(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    name = write_project(tmp_path / "app")
    # Two images of the class, as two deployed versions would have.
    tags = []
    for n in (1, 2):
        tag = f"dockyard-t-{secrets.token_hex(4)}:v{n}"
        await docker_runtime.build_image(
            tmp_path / "app" / "web",
            Path("Dockerfile"),
            tag,
            {},
            lambda line: None,
            labels={"dockyard.app": name},
        )
        tags.append(tag)
    app = App(
        tmp_path / "app",
        settings=Settings(
            state_dir=tmp_path / "state", containers=ContainerSettings(stop_grace=5.0)
        ),
        owner="test-" + secrets.token_hex(4),
        image_overrides={"Web": tags[0]},
    )
    await app.start()
    gateway = Gateway(app.handle, port=0)
    port = await gateway.start()
    base = f"http://127.0.0.1:{port}/c/WEB/w"
    try:
        async with aiohttp.ClientSession() as session:

            async def get(path: str) -> tuple[int, str]:
                async with session.get(base + path) as response:
                    return response.status, await response.text()

            assert (await get("/"))[0] == 200
            before = app.instances()
            assert [i["image"] for i in before] == [tags[0]]

            assert app.containers is not None
            await app.containers.set_images({"Web": tags[1]})
            slow = asyncio.create_task(get("/cgi-bin/slow?1"))

            async def in_flight() -> bool:
                return app.instances()[0]["inflight"] >= 1

            await wait_until(in_flight)  # the slow request is on the old container
            replacing = asyncio.create_task(app.replace("Web", before[0]["object_id"]))
            # These arrive while it drains, stops or starts (or just after): all must pass.
            during = [asyncio.create_task(get("/")) for _ in range(5)]
            assert await replacing is True
            assert await slow == (200, "slow done\n")
            assert [status for status, _ in await asyncio.gather(*during)] == [200] * 5

            after = app.instances()
            assert [i["image"] for i in after] == [tags[1]]
            assert after[0]["container_id"] != before[0]["container_id"]
            assert await docker_runtime.inspect(before[0]["container_id"]) is None
    finally:
        await gateway.stop()
        await app.stop()
        for tag in tags:
            await asyncio.to_thread(_remove_image, tag)


def _remove_image(tag: str) -> None:
    import subprocess

    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)
