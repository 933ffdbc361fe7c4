"""Requests reach a container port on the container's own loopback (containers/netns.py),
not through the engine's userland proxy, and fall back to the published port."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from dockyard.containers.docker import DockerRuntime
from dockyard.containers.netns import connect_in_namespace, listen_in_namespace
from dockyard.errors import ContainerError
from tests.support.devserver import DevServer
from tests.support.projects import Project, make_project

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="entering a namespace needs root"),
]


@pytest_asyncio.fixture
async def project(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> AsyncIterator[Project]:
    made = make_project(tmp_path / "app", {"Web": {}, "Outside": {}})
    try:
        yield made
    finally:
        for info in await docker_runtime.list(made.labels):
            await docker_runtime.remove(info.id)


async def remote_address(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        env = await response.text()
    [line] = [line for line in env.splitlines() if line.startswith("REMOTE_ADDR=")]
    return line.removeprefix("REMOTE_ADDR=")


async def test_requests_reach_the_container_on_its_own_loopback(project: Project) -> None:
    with DevServer(project.root) as dev:
        async with aiohttp.ClientSession() as session:
            # Through the engine's proxy the container would see its bridge's gateway.
            # (busybox httpd writes IPv4 peers as IPv4-mapped IPv6: [::ffff:127.0.0.1])
            for _ in range(3):
                address = await remote_address(session, f"{dev.url}/c/WEB/a/cgi-bin/env")
                assert address in ("127.0.0.1", "[::ffff:127.0.0.1]")


async def test_a_server_on_its_external_address_only_is_reached_at_the_published_port(
    project: Project,
) -> None:
    with DevServer(project.root) as dev:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                address = await remote_address(session, f"{dev.url}/c/OUTSIDE/b/cgi-bin/env")
                assert "127.0.0.1" not in address
            async with session.get(f"{dev.url}/c/OUTSIDE/b/") as response:
                assert response.status == 200
                assert await response.text() == "hello from the container\n"


async def test_a_process_of_another_container_is_never_entered() -> None:
    # This test's own process: its cgroup names no such container, so nothing is entered
    # (and nothing connects or listens, although something may listen on that port here).
    with pytest.raises(ContainerError, match="is not container"):
        await asyncio.wait_for(connect_in_namespace(os.getpid(), "f" * 64, 22, 1.0), 10)
    with pytest.raises(ContainerError, match="is not container"):
        await asyncio.wait_for(listen_in_namespace(os.getpid(), "f" * 64, 0), 10)
