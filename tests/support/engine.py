"""Fixtures for tests on the real container engine.

Every container a test starts carries `test_labels`; the fixture removes all containers
(and images) with those labels afterwards, so no test leaves anything behind. A test's
app named with `app_name()` has its images removed when the session (or worker) ends.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import pytest_asyncio

from dockyard.containers.docker import DockerRuntime

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _script(name: str) -> str:
    result = subprocess.run(
        [str(ROOT / "scripts" / name)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/{name} failed:\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def busybox_image() -> str:
    return _script("base-image")


@pytest.fixture(scope="session")
def python_image() -> str:
    return _script("python-base-image")


@pytest_asyncio.fixture
async def busybox_tag(busybox_image: str) -> AsyncIterator[str]:
    """A tag of the busybox image that is this test's alone (removed after it): for tests
    where an app may run exactly one image."""
    ref = f"dockyard/test-image:{secrets.token_hex(4)}"
    await docker_cli("tag", busybox_image, ref)
    yield ref
    await docker_cli("image", "rm", ref)


# Names handed out by app_name() in this process (one pytest session, or one xdist worker).
_app_names: list[str] = []


def app_name(prefix: str = "t") -> str:
    """A unique app name for a test's project; the images built for it (labelled with
    it) are removed when this process's tests end."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    _app_names.append(name)
    return name


@pytest.fixture(scope="session", autouse=True)
def _remove_app_images() -> Iterator[None]:
    # At the end of the session, not of each test: a module's fixture may share one app
    # (and its running containers) across tests. Each app's images carry its name as a
    # label, and a name belongs to this process alone: another worker's images, or
    # another checkout's, are never touched.
    yield
    for name in _app_names:
        try:
            remove_labelled_images(f"dockyard.app={name}")
        except AssertionError as exc:  # (in use by a container a test left running)
            warnings.warn(f"images of app {name} left: {exc}", stacklevel=1)
    _app_names.clear()


@pytest_asyncio.fixture
async def docker_runtime() -> AsyncIterator[DockerRuntime]:
    async with DockerRuntime() as runtime:
        yield runtime


@pytest_asyncio.fixture
async def test_labels(docker_runtime: DockerRuntime) -> AsyncIterator[dict[str, str]]:
    labels = {"dockyard.app": f"test-{secrets.token_hex(4)}"}
    yield labels
    for info in await docker_runtime.list(labels):
        await docker_runtime.remove(info.id)
    # Images built by a test carry the same labels; remove them too (by label, never
    # by name), so reruns start clean.
    label_filter = ",".join(f"{key}={value}" for key, value in labels.items())
    await asyncio.to_thread(remove_labelled_images, label_filter)


def docker(*args: str, stdin: str | None = None) -> str:
    """Run the docker CLI and wait (blocking: for sync helpers and threads); its output."""
    done = subprocess.run(["docker", *args], input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def remove_labelled_images(label_filter: str) -> None:
    """Every image with the label (``key=value``), a layer at a time from the top, never
    pruning an unlabelled parent: that is a build-cache layer (a Dockerfile's steps come
    before the build's own LABEL), which another test's build in another worker may be
    using at this moment. Pruned, it fails that build ("failed to get digest ...").
    Blocking (it runs the docker CLI): from a coroutine, run it in a thread."""
    for _ in range(16):
        found = docker("image", "ls", "-q", "--filter", f"label={label_filter}").split()
        if not found:
            return
        docker("image", "rm", "-f", "--no-prune", *sorted(set(found)))


async def docker_cli(*args: str) -> str:
    """Run the docker CLI (for checks and cleanup the runtime API does not offer)."""
    proc = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {err.decode()}")
    return out.decode()


async def wait_until(
    check: Callable[[], Awaitable[T | None]], *, within: float = 10.0, interval: float = 0.02
) -> T:
    """Poll `check` until it returns something truthy; fail the test after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(interval)


async def http_get_when_ready(url: str, *, within: float = 10.0) -> str:
    """GET `url`, retrying while nothing listens yet; returns the body of a 200."""
    async with aiohttp.ClientSession() as session:

        async def attempt() -> str | None:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    return await resp.text() if resp.status == 200 else None
            except (TimeoutError, aiohttp.ClientConnectionError):
                return None

        return await wait_until(attempt, within=within, interval=0.01)


async def engine_inspect(container_id: str) -> dict[str, Any]:
    """The engine's raw view of a container, for checks the runtime API does not expose."""
    data: dict[str, Any] = json.loads(await docker_cli("inspect", container_id))[0]
    return data
