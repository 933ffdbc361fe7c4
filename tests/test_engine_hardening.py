"""Container hardening, egress blocking and the engine seam, on the real engine."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest
import pytest_asyncio

from dockyard.containers.docker import DockerRuntime
from dockyard.containers.images import ensure_image
from dockyard.containers.runtime import (
    DEFAULT_CAP_DROP,
    ContainerExec,
    ContainerLifecycle,
    ContainerLogs,
    ContainerRuntime,
    ContainerSpec,
    ImageStore,
)
from tests.support.engine import docker_cli, engine_inspect, http_get_when_ready

pytestmark = pytest.mark.docker

IDLES = ["sh", "-c", 'trap "" TERM; while :; do sleep 0.05; done']
HTTPD = [
    "sh",
    "-c",
    "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www",
]
NET_RAW_BIT = 13  # CAP_NET_RAW in the kernel's capability numbering
# The one outside address tests may contact. busybox's own `wget -T` crashes in the
# static build, so its `timeout` applet bounds the attempt.
PACKAGE_INDEX = "http://deb.debian.org/debian/"
REACH_INDEX = ["sh", "-c", f"timeout 6 wget -q -O /dev/null {PACKAGE_INDEX}"]


async def status_field(runtime: DockerRuntime, container_id: str, name: str) -> str:
    """A field of /proc/self/status as a process in the container sees it."""
    result = await runtime.exec(container_id, ["grep", f"^{name}:", "/proc/self/status"])
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode().split(":", 1)[1].strip()


async def has_net_raw(runtime: DockerRuntime, container_id: str) -> bool:
    return bool(int(await status_field(runtime, container_id, "CapBnd"), 16) >> NET_RAW_BIT & 1)


def test_docker_runtime_implements_each_concern() -> None:
    runtime = DockerRuntime()
    for protocol in (ImageStore, ContainerLifecycle, ContainerExec, ContainerLogs):
        assert isinstance(runtime, protocol), protocol.__name__
    assert isinstance(runtime, ContainerRuntime)


async def test_a_fake_of_one_concern_is_enough_for_ensure_image() -> None:
    class OnlyImages:
        """Implements ImageStore and nothing else."""

        def __init__(self) -> None:
            self.asked: list[str] = []

        async def build_image(
            self,
            context_dir: Path,
            dockerfile: Path,
            tag: str,
            build_args: Mapping[str, str],
            on_output: Callable[[str], None],
            labels: Mapping[str, str] | None = None,
        ) -> str:
            raise AssertionError("nothing to build")

        async def image_id(self, ref: str) -> str | None:
            self.asked.append(ref)
            return "sha256:" + "0" * 64

    images = OnlyImages()
    assert isinstance(images, ImageStore) and not isinstance(images, ContainerLifecycle)
    ref = await ensure_image(
        images,
        app="a",
        class_name="C",
        image="local/x:1",
        dockerfile=None,
        context=None,
        build_args={},
        on_output=print,
    )
    assert ref == "sha256:" + "0" * 64 and images.asked == ["local/x:1"]


async def test_hardening_defaults_show_in_docker_inspect(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    info = await docker_runtime.run(
        ContainerSpec(image=busybox_image, labels=test_labels, entrypoint=IDLES)
    )
    host = (await engine_inspect(info.id))["HostConfig"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert sorted(host["CapDrop"]) == sorted(DEFAULT_CAP_DROP)
    assert "NET_RAW" in host["CapDrop"]
    assert not host["CapAdd"]
    assert host["PidsLimit"] == 512
    assert host["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-size": "10m", "max-file": "3"},
    }
    assert host["ReadonlyRootfs"] is False
    # And the kernel agrees, for a process started in the container.
    assert await status_field(docker_runtime, info.id, "NoNewPrivs") == "1"
    assert not await has_net_raw(docker_runtime, info.id)
    writable = await docker_runtime.exec(info.id, ["touch", "/written"])
    assert writable.exit_code == 0


async def test_hardening_overrides_cap_add_and_read_only_root(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    info = await docker_runtime.run(
        ContainerSpec(
            image=busybox_image,
            labels=test_labels,
            entrypoint=IDLES,
            cap_add=("NET_RAW",),
            pids_limit=64,
            read_only=True,
            tmp_size_mib=8,
            no_new_privileges=False,
        )
    )
    host = (await engine_inspect(info.id))["HostConfig"]
    assert host["CapAdd"] == ["NET_RAW"]
    assert "NET_RAW" not in host["CapDrop"]
    assert host["PidsLimit"] == 64
    assert host["ReadonlyRootfs"] is True
    assert host["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,mode=1777,size=8m"}
    assert not host["SecurityOpt"]
    assert await has_net_raw(docker_runtime, info.id)
    assert await status_field(docker_runtime, info.id, "NoNewPrivs") == "0"

    root = await docker_runtime.exec(info.id, ["touch", "/written"])
    assert root.exit_code != 0 and b"Read-only file system" in root.stderr
    tmp = await docker_runtime.exec(info.id, ["sh", "-c", "echo x > /tmp/f && cat /tmp/f"])
    assert (tmp.exit_code, tmp.stdout) == (0, b"x\n")


async def test_pids_limit_stops_a_fork_bomb_short(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    info = await docker_runtime.run(
        ContainerSpec(image=busybox_image, labels=test_labels, entrypoint=IDLES, pids_limit=16)
    )
    # 40 sleepers from one shell: the engine's pids cgroup refuses the ones past the limit
    # (busybox sh gives up at the first refused fork).
    script = "for i in $(seq 40); do sleep 5 & done; echo all-started"
    result = await docker_runtime.exec(info.id, ["sh", "-c", script])
    assert result.exit_code != 0 and b"all-started" not in result.stdout
    assert b"can't fork" in result.stderr, result


async def test_engine_info_reports_the_host(docker_runtime: DockerRuntime) -> None:
    info = await docker_runtime.engine_info()
    cpus, memory, version = (
        await docker_cli("info", "-f", "{{.NCPU}} {{.MemTotal}} {{.ServerVersion}}")
    ).split()
    assert (info.cpus, info.memory_bytes, info.version) == (int(cpus), int(memory), version)
    security = await docker_cli("info", "-f", "{{json .SecurityOptions}}")
    assert info.userns_remap == ("name=userns" in security)


@pytest_asyncio.fixture
async def isolated_runtime(test_labels: dict[str, str]) -> AsyncIterator[DockerRuntime]:
    """A runtime with a no-internet network of its own, removed (with its rule) after."""
    network = f"dockyard-test-{test_labels['dockyard.app']}"
    async with DockerRuntime(no_internet_network=network) as runtime:
        try:
            yield runtime
        finally:
            for found in await runtime.list(test_labels):
                await runtime.remove(found.id)
            await runtime.remove_no_internet_network()


@pytest.mark.slow
async def test_enable_internet_false_blocks_egress_and_keeps_the_port(
    isolated_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    runtime = isolated_runtime
    online = await runtime.run(
        ContainerSpec(image=busybox_image, labels=test_labels, entrypoint=HTTPD, ports=[8080])
    )
    offline = await runtime.run(
        ContainerSpec(
            image=busybox_image,
            labels=test_labels,
            entrypoint=HTTPD,
            ports=[8080],
            enable_internet=False,
        )
    )
    assert await http_get_when_ready(f"http://127.0.0.1:{offline.host_ports[8080]}/") == "hello\n"

    reached_online, reached_offline = await asyncio.gather(
        runtime.exec(online.id, REACH_INDEX), runtime.exec(offline.id, REACH_INDEX)
    )
    assert reached_offline.exit_code != 0, "a no-internet container reached the package index"
    # Still serving from loopback after all that.
    assert await http_get_when_ready(f"http://127.0.0.1:{offline.host_ports[8080]}/") == "hello\n"

    if runtime.capabilities.egress_firewall:
        # Refused at the host at once, rather than sent out and never answered: the
        # packets do not leave. (The address is the package index's, resolved here.)
        address = socket.getaddrinfo("deb.debian.org", 80, socket.AF_INET)[0][4][0]
        probe = await runtime.exec(offline.id, ["nc", "-w", "5", address, "80"])
        assert probe.exit_code != 0 and b"No route to host" in probe.stderr, probe

    if reached_online.exit_code != 0:
        pytest.skip(
            "the package index is unreachable even with internet (no NAT path out of "
            "this machine): only the blocked half and the port were checked"
        )
