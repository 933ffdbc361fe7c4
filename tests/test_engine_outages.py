"""Engine outages on the real engine: an engine error is never taken for a container exit.

The runtime under test talks to the engine through `EngineSocketProxy`
(tests/support/engine_proxy.py), which a test can cut and restore.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from dockyard.containers import labels
from dockyard.containers.docker import DockerRuntime
from dockyard.containers.runtime import ContainerSpec
from dockyard.errors import ContainerGone, EngineUnavailable
from tests.support.engine import wait_until
from tests.support.engine_proxy import EngineSocketProxy, open_engine_proxy

pytestmark = pytest.mark.docker

IDLES = ["sh", "-c", 'trap "" TERM; while :; do sleep 0.05; done']


@pytest_asyncio.fixture
async def engine_proxy() -> AsyncIterator[EngineSocketProxy]:
    async with open_engine_proxy() as proxy:
        yield proxy


@pytest_asyncio.fixture
async def proxied_runtime(engine_proxy: EngineSocketProxy) -> AsyncIterator[DockerRuntime]:
    async with DockerRuntime(engine_proxy.url) as runtime:
        yield runtime


async def test_wait_raises_engine_unavailable_when_the_engine_goes_away(
    docker_runtime: DockerRuntime,
    proxied_runtime: DockerRuntime,
    engine_proxy: EngineSocketProxy,
    busybox_image: str,
    test_labels: dict[str, str],
) -> None:
    info = await proxied_runtime.run(
        ContainerSpec(image=busybox_image, labels=test_labels, entrypoint=IDLES)
    )
    waiting = asyncio.create_task(proxied_runtime.wait(info.id))
    wait_path = f"/containers/{info.id}/wait".encode()

    async def wait_reached_engine() -> bool:
        return wait_path in engine_proxy.sent

    await wait_until(wait_reached_engine)
    assert not waiting.done()

    loop = asyncio.get_running_loop()
    cut_at = loop.time()
    await engine_proxy.cut()
    with pytest.raises(EngineUnavailable) as caught:
        await asyncio.wait_for(waiting, 10)
    print(f"engine cut -> wait() raised EngineUnavailable: {(loop.time() - cut_at) * 1000:.1f} ms")
    # What a client may see says nothing about where the engine lives; the log does.
    assert caught.value.public == "engine unavailable"
    assert caught.value.address == engine_proxy.url
    assert str(engine_proxy.path) in str(caught.value)

    # While the engine is away nothing may pass for "gone" or "no containers".
    with pytest.raises(EngineUnavailable):
        await proxied_runtime.inspect(info.id)
    with pytest.raises(EngineUnavailable):
        await proxied_runtime.list(test_labels)
    with pytest.raises(EngineUnavailable):
        await proxied_runtime.wait(info.id)

    # The container never stopped: the outage was the engine's, not the container's.
    seen_directly = await docker_runtime.inspect(info.id)
    assert seen_directly is not None and seen_directly.running

    await engine_proxy.restore()
    after = await proxied_runtime.inspect(info.id)
    assert after is not None and after.running
    assert [found.id for found in await proxied_runtime.list(test_labels)] == [info.id]
    waiting_again = asyncio.create_task(proxied_runtime.wait(info.id))
    await docker_runtime.kill(info.id)
    status = await asyncio.wait_for(waiting_again, 10)
    assert (status.exit_code, status.oom_killed) == (137, False)


async def test_a_wedged_engine_is_unavailable_for_short_calls(
    engine_proxy: EngineSocketProxy, busybox_image: str, test_labels: dict[str, str]
) -> None:
    # Created with the default timeout: a start on a busy machine can take over 0.5 s.
    async with DockerRuntime(engine_proxy.url) as starter:
        info = await starter.run(
            ContainerSpec(image=busybox_image, labels=test_labels, entrypoint=IDLES)
        )
    async with DockerRuntime(engine_proxy.url, request_timeout=0.5) as runtime:
        engine_proxy.stall()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(EngineUnavailable, match=r"did not answer within 0\.5 s"):
            await runtime.inspect(info.id)
        with pytest.raises(EngineUnavailable):
            await runtime.list(test_labels)
        with pytest.raises(EngineUnavailable):
            await runtime.signal(info.id, "SIGTERM")
        assert loop.time() - started < 5
        await engine_proxy.restore()
        after = await runtime.inspect(info.id)
        assert after is not None and after.running


async def test_wait_raises_container_gone_only_for_a_missing_container(
    proxied_runtime: DockerRuntime, engine_proxy: EngineSocketProxy
) -> None:
    with pytest.raises(ContainerGone):
        await proxied_runtime.wait("dockyard-test-no-such-container")
    assert await proxied_runtime.inspect("dockyard-test-no-such-container") is None
    await engine_proxy.cut()
    with pytest.raises(EngineUnavailable):
        await proxied_runtime.wait("dockyard-test-no-such-container")
    with pytest.raises(EngineUnavailable):
        await proxied_runtime.inspect("dockyard-test-no-such-container")


async def test_list_by_owner_label(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    mine = {**test_labels, labels.OWNER: f"{test_labels['dockyard.app']}-node-a"}
    theirs = {**test_labels, labels.OWNER: f"{test_labels['dockyard.app']}-node-b"}
    ours = await docker_runtime.run(
        ContainerSpec(image=busybox_image, labels=mine, entrypoint=IDLES)
    )
    await docker_runtime.run(ContainerSpec(image=busybox_image, labels=theirs, entrypoint=IDLES))
    found = await docker_runtime.list({labels.OWNER: mine[labels.OWNER]})
    assert [info.id for info in found] == [ours.id]
    assert found[0].labels[labels.OWNER] == mine[labels.OWNER]
