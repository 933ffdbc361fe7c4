"""Egress control through a real `dockyard serve`: the app deployed to a node runs its
worker in an unprivileged process of its own uid; the node makes the proxy's listener in
the container and hands it over, and the handler answers from the app process."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dockyard.containers.docker import DockerRuntime
from tests.support.engine import docker_cli
from tests.support.node import Node, running_node
from tests.test_egress_engine import Answer, write_project

pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="egress control needs root (setns)"),
]


async def call(node: Node, app: str, path: str, *args: Any) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            node.app_url + path,
            headers={"Host": f"{app}.localhost"},
            data=json.dumps(list(args)),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


async def container_get(node: Node, app: str, url: str, header: str = "") -> Answer:
    return Answer.parse(await call(node, app, "/ALLOWING/s/get", url, header, False))


def test_a_deployed_app_filters_and_answers_its_containers_requests(tmp_path: Path) -> None:
    name = write_project(tmp_path / "app")
    config = tmp_path / "app" / "wrangler.jsonc"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "compatibility_flags": ["python_workers"]})
    )
    try:
        with running_node() as node:
            deployed = node.deploy(str(tmp_path / "app"))
            assert deployed.returncode == 0, deployed.stderr
            asyncio.run(scenario(node, name))
    finally:
        # The deploy built and pushed one image per class (the node and its containers
        # are gone by now): remove every tag of them.
        asyncio.run(remove_images(f"dockyard-{name}-*", f"*/{name}/*"))


async def remove_images(*references: str) -> None:
    for reference in references:
        found = await docker_cli("image", "ls", "-q", "--filter", f"reference={reference}")
        if found.split():
            await docker_cli("image", "rm", "-f", *set(found.split()))


async def scenario(node: Node, name: str) -> None:
    handled = await container_get(node, name, "http://api.internal/z", "x-from-container: serve")
    assert (handled.status, handled.headers.get("x-handled-by")) == (200, "worker"), handled
    assert handled.body == "worker saw GET http://api.internal/z serve\n"
    assert (await container_get(node, name, "http://other.test/")).status == 520
    # The handler ran in the app's own process, under the app's own uid (not root).
    who = await container_get(node, name, "http://who.glob.test/")
    match = re.fullmatch(r"uid=(\d+) pid=(\d+)\n", who.body)
    assert match is not None, who
    assert int(match.group(1)) != 0
    assert node.proc is not None and int(match.group(2)) != node.proc.pid
    # Requests reach the container on its own loopback, without the engine's userland
    # proxy: the node made that connection inside the container and handed it over.
    peer = await call(node, name, "/ALLOWING/s/peer")
    assert peer.strip("[]").removeprefix("::ffff:") == "127.0.0.1", peer
    async with DockerRuntime() as runtime:
        (info,) = [i for i in await runtime.list({"dockyard.app": name}) if i.running]
    assert info.labels["dockyard.class"] == "Allowing"
    networks = await docker_cli("inspect", "-f", "{{json .NetworkSettings.Networks}}", info.id)
    assert list(json.loads(networks)) == ["dockyard-no-internet"]
