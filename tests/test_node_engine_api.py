"""The node's engine API (node/engine_api.py) and its client (containers/remote.py), on
the real engine over a real unix socket, plus DockerRuntime's push and pull against a
real registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from dockyard.config import load_config
from dockyard.containers import labels
from dockyard.containers.docker import DockerRuntime
from dockyard.containers.manager import ContainerManager
from dockyard.containers.readiness import Readiness
from dockyard.containers.remote import RemoteRuntime
from dockyard.containers.runtime import ContainerRuntime, ContainerSpec, ImagePorts
from dockyard.containers.supervisor import ContainerOptions, Phase, StartOverrides
from dockyard.errors import ContainerGone, EngineUnavailable, ImageError, StartFailed
from dockyard.node.engine_api import MAX_PIDS_LIMIT, EngineApi
from dockyard.settings import ContainerSettings
from tests.support.engine import docker_cli, engine_inspect, wait_until

pytestmark = pytest.mark.docker

# Prints "hello", then "bye" on stderr and exits 7 on SIGTERM.
TRAPS_TERM = [
    "sh",
    "-c",
    "echo hello; trap 'echo bye >&2; exit 7' TERM; while :; do sleep 0.1; done",
]
SLEEPS = ["sh", "-c", "while :; do sleep 0.1; done"]


@pytest.fixture
def allowed_ref(busybox_tag: str) -> str:
    """A tag of its own for each test: the one image its app may run."""
    return busybox_tag


class Node:
    def __init__(self, api: EngineApi, app: str, owner: str, socket_path: Path) -> None:
        self.api = api
        self.app = app
        self.owner = owner
        self.socket_path = socket_path

    @property
    def labels(self) -> dict[str, str]:
        return {labels.APP: self.app, labels.OWNER: self.owner}


@pytest_asyncio.fixture
async def node(
    docker_runtime: DockerRuntime, test_labels: dict[str, str], allowed_ref: str, tmp_path: Path
) -> AsyncIterator[Node]:
    app = test_labels[labels.APP]  # the fixture removes the app's containers afterwards
    owner = f"owner-{secrets.token_hex(4)}"
    socket_path = tmp_path / "engine.sock"
    async with EngineApi(docker_runtime, owner) as api:
        await api.open(app, socket_path, lambda: {allowed_ref}, None)
        yield Node(api, app, owner, socket_path)


@pytest_asyncio.fixture
async def remote(node: Node) -> AsyncIterator[RemoteRuntime]:
    async with RemoteRuntime(node.socket_path) as runtime:
        yield runtime


def spec(node: Node, image: str, cmd: list[str], **extra: Any) -> ContainerSpec:
    """What ContainerManager asks for."""
    return ContainerSpec(
        image=image,
        labels={**node.labels, labels.CLASS: "Web", labels.OBJECT: "obj-1"},
        entrypoint=cmd,
        **extra,
    )


@pytest.mark.slow
async def test_an_app_runs_and_controls_its_container_through_the_socket(
    node: Node, remote: RemoteRuntime, docker_runtime: DockerRuntime, allowed_ref: str
) -> None:
    assert isinstance(remote, ContainerRuntime) and isinstance(remote, ImagePorts)
    info = await remote.run(spec(node, allowed_ref, TRAPS_TERM))
    assert info.running and info.image == allowed_ref
    assert info.labels[labels.APP] == node.app and info.labels[labels.OWNER] == node.owner
    assert info.labels[labels.CLASS] == "Web" and info.started_at is not None
    assert await remote.inspect(info.id) == info
    # Full ids only: a prefix or a name is no container at all.
    assert await remote.inspect(info.id[:12]) is None and await remote.inspect(info.name) is None
    assert [c.id for c in await remote.list(node.labels)] == [info.id]
    assert remote.capabilities.internet_isolation is True
    assert await remote.image_id(allowed_ref) is not None
    assert await remote.exposed_ports(allowed_ref) == ()
    assert await remote.engine_info() == await docker_runtime.engine_info()

    result = await remote.exec(info.id, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    cmd = ["sh", "-c", 'printf "a\\0b"; echo "$X" >&2; exit 4']
    async with remote.exec_stream(info.id, cmd, env={"X": "from env"}) as proc:
        chunks = [chunk async for chunk in proc]
        code = await proc.exit_code()
    assert code == 4
    assert b"".join(c for s, c in chunks if s == "stdout") == b"a\0b"
    assert b"".join(c for s, c in chunks if s == "stderr") == b"from env\n"

    await remote.pause(info.id)
    assert (await _status(remote, info.id)) == "paused"
    await remote.unpause(info.id)
    assert (await _status(remote, info.id)) == "running"
    await remote.set_cpu_limit(info.id, 0.5)
    assert (await engine_inspect(info.id))["HostConfig"]["NanoCpus"] == 500_000_000

    lines = remote.logs(info.id, follow=True)
    assert await anext(lines) == "hello"
    waiting = asyncio.create_task(remote.wait(info.id))
    await remote.signal(info.id, "SIGTERM")
    status = await waiting
    assert (status.exit_code, status.oom_killed) == (7, False)
    # The follow ends by itself once the container stopped.
    assert [line async for line in lines] == ["bye"]
    assert [line async for line in remote.logs(info.id, tail=1)] == ["bye"]

    other = await remote.run(spec(node, allowed_ref, SLEEPS))
    waiting = asyncio.create_task(remote.wait(other.id))
    await remote.kill(other.id)
    assert (await waiting).exit_code == 137
    await remote.stop(other.id, grace_period=0)  # stopped already: a no-op
    for container_id in (info.id, other.id):
        await remote.remove(container_id)
        assert await remote.inspect(container_id) is None
        await remote.remove(container_id)  # gone already: a no-op
    assert await remote.list(node.labels) == []
    with pytest.raises(ContainerGone):
        await remote.wait(info.id)


async def _status(runtime: RemoteRuntime, container_id: str) -> str:
    info = await runtime.inspect(container_id)
    assert info is not None
    return info.status


async def test_an_image_the_app_did_not_deploy_is_refused(
    node: Node, remote: RemoteRuntime, docker_runtime: DockerRuntime, busybox_image: str
) -> None:
    with pytest.raises(ImageError) as caught:
        await remote.run(spec(node, busybox_image, SLEEPS))
    assert str(caught.value) == (
        f"Image {busybox_image!r} is not one of the images app {node.app!r} deployed; "
        "a node runs only the images its versions name (by digest)"
    )
    # The engine has it, but the app is told nothing about it.
    assert await docker_runtime.image_id(busybox_image) is not None
    assert await remote.image_id(busybox_image) is None
    with pytest.raises(ImageError, match="is not one of the images"):
        await remote.exposed_ports(busybox_image)
    with pytest.raises(ImageError, match="built by dockyard deploy, not on the node"):
        await remote.build_image(Path("."), Path("Dockerfile"), "x", {}, print)
    assert await docker_runtime.list(node.labels) == []


async def test_another_apps_containers_look_like_no_container_at_all(
    node: Node, remote: RemoteRuntime, docker_runtime: DockerRuntime, allowed_ref: str
) -> None:
    name = f"dy-engine-api-{secrets.token_hex(4)}"
    foreign = [
        # Another app of the same node, and this app's name under another owner.
        ContainerSpec(
            image=allowed_ref,
            labels={labels.APP: f"other-{node.app}", labels.OWNER: node.owner},
            entrypoint=SLEEPS,
            name=name,
        ),
        ContainerSpec(
            image=allowed_ref,
            labels={labels.APP: node.app, labels.OWNER: "another-owner"},
            entrypoint=SLEEPS,
        ),
    ]
    started = [await docker_runtime.run(s) for s in foreign]
    try:
        missing = "0123456789ab" * 5 + "cdef"
        calls: list[Callable[[str], Awaitable[Any]]] = [
            remote.wait,
            remote.kill,
            lambda target: remote.signal(target, "SIGTERM"),
            lambda target: remote.stop(target, 0),
            remote.pause,
            remote.unpause,
            lambda target: remote.set_cpu_limit(target, 1),
            lambda target: remote.exec(target, ["true"]),
            lambda target: _drain(remote.logs(target, follow=True)),
            lambda target: _exec_stream(remote, target),
        ]
        for target in [*(info.id for info in started), name]:
            assert await remote.inspect(target) is None
            for call in calls:
                with pytest.raises(ContainerGone) as caught:
                    await call(target)
                with pytest.raises(ContainerGone) as nothing:
                    await call(missing)
                # Word for word what a container that does not exist gets.
                assert str(caught.value).replace(target[:12], "<id>") == str(nothing.value).replace(
                    missing[:12], "<id>"
                )
            await remote.remove(target)
        assert await remote.list({}) == []
        assert await remote.list({labels.APP: f"other-{node.app}"}) == []
        assert await remote.list({labels.OWNER: "another-owner"}) == []
        for info in started:  # untouched by all of the above
            now = await docker_runtime.inspect(info.id)
            assert now is not None and now.running
    finally:
        for info in started:
            await docker_runtime.remove(info.id)


async def _drain(lines: AsyncIterator[str]) -> None:
    async for _ in lines:
        pass


async def _exec_stream(runtime: RemoteRuntime, target: str) -> None:
    async with runtime.exec_stream(target, ["true"]) as proc:
        await proc.exit_code()


async def test_labels_capabilities_and_limits_are_the_nodes_to_set(
    node: Node, remote: RemoteRuntime, docker_runtime: DockerRuntime, allowed_ref: str
) -> None:
    base = spec(node, allowed_ref, SLEEPS)
    refused = {
        labels.APP: f"other-{node.app}",
        labels.OWNER: "another-owner",
        "dockyard.managed": "true",
    }
    for key, value in refused.items():
        with pytest.raises(StartFailed, match=re.escape(f"Label {key!r}")):
            await remote.run(
                ContainerSpec(
                    image=allowed_ref, labels={**base.labels, key: value}, entrypoint=SLEEPS
                )
            )
    with pytest.raises(StartFailed, match="SYS_ADMIN are refused"):
        await remote.run(
            ContainerSpec(image=allowed_ref, entrypoint=SLEEPS, cap_add=("SYS_ADMIN",))
        )
    assert await docker_runtime.list(node.labels) == []

    # Without the forced labels at all, and asking for more than the node gives.
    host = await docker_runtime.engine_info()
    info = await remote.run(
        ContainerSpec(
            image=allowed_ref,
            labels={labels.CLASS: "Web", "team": "a"},
            entrypoint=SLEEPS,
            vcpu=host.cpus * 8.0,
            memory_mib=host.memory_bytes // 1024 // 1024 * 4,
            pids_limit=None,
            no_new_privileges=False,
            log_max_size_mib=None,
            cap_add=("NET_RAW",),
            name="web-1",
        )
    )
    # (the image's own labels show up beside them)
    assert info.labels.items() >= {**node.labels, labels.CLASS: "Web", "team": "a"}.items()
    assert info.name == f"{node.app}_web-1"
    host_config = (await engine_inspect(info.id))["HostConfig"]
    assert host_config["NanoCpus"] == host.cpus * 1_000_000_000
    assert host_config["Memory"] == host.memory_bytes // 1024 // 1024 * 1024 * 1024
    assert host_config["PidsLimit"] == MAX_PIDS_LIMIT
    assert host_config["SecurityOpt"] == ["no-new-privileges:true"]
    assert host_config["LogConfig"]["Config"]["max-size"] == "10m"
    assert host_config["CapAdd"] == ["NET_RAW"]


async def test_socket_is_private_to_the_apps_uid(
    docker_runtime: DockerRuntime, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    async with EngineApi(docker_runtime, "owner") as api:
        path = tmp_path / "engine.sock"
        await api.open("app-a", path, set, 65534)
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == 65534
        await api.close("app-a")
        assert not path.exists()


@pytest.mark.slow
async def test_a_node_not_answering_is_an_engine_outage(
    node: Node, remote: RemoteRuntime, allowed_ref: str, tmp_path: Path
) -> None:
    info = await remote.run(spec(node, allowed_ref, SLEEPS))
    before = await _connections(node.socket_path)
    waiter = RemoteRuntime(node.socket_path)  # a connection of its own for the long poll
    waiting = asyncio.create_task(waiter.wait(info.id))
    await wait_until(lambda: _more_connections(node.socket_path, before))
    await node.api.close(node.app)
    with pytest.raises(EngineUnavailable, match=r"not answering|broke off"):
        await waiting
    await waiter.aclose()
    for runtime in (remote, RemoteRuntime(tmp_path / "missing.sock")):
        with pytest.raises(EngineUnavailable, match="not answering"):
            await runtime.inspect(info.id)
        with pytest.raises(EngineUnavailable):
            await runtime.list({})
        with pytest.raises(EngineUnavailable):
            await _drain(runtime.logs(info.id))
        await runtime.aclose()
    # A socket file nobody listens on: connection refused.
    refused = tmp_path / "refused.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(refused))
        async with RemoteRuntime(refused) as runtime:
            with pytest.raises(EngineUnavailable, match="not answering"):
                await runtime.engine_info()
    # Serving again: the app's container is still there, untouched.
    await node.api.open(node.app, node.socket_path, lambda: {allowed_ref}, None)
    again = await remote.inspect(info.id)
    assert again is not None and again.running


async def _connections(path: Path) -> int:
    """Sockets on `path` (the listening one and each connection the node accepted)."""
    out = await asyncio.to_thread(Path("/proc/net/unix").read_text)
    return sum(line.endswith(f" {path}") for line in out.splitlines())


async def _more_connections(path: Path, than: int) -> bool:
    return await _connections(path) > than


class _Hooks:
    async def on_start(self) -> None:
        pass

    async def on_stop(self, params: Any) -> None:
        pass

    async def on_error(self, error: BaseException) -> None:
        pass

    async def on_activity_expired(self) -> None:
        pass


@pytest.mark.slow
async def test_the_container_manager_runs_unchanged_over_the_socket(
    node: Node,
    remote: RemoteRuntime,
    docker_runtime: DockerRuntime,
    allowed_ref: str,
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "worker.py").write_text("class Box:\n    pass\n")
    (project / "wrangler.json").write_text(
        json.dumps(
            {
                "name": node.app,
                "main": "worker.py",
                "containers": [{"class_name": "Box", "image": "built/by-deploy:1"}],
                "durable_objects": {"bindings": [{"name": "BOX", "class_name": "Box"}]},
                "migrations": [{"tag": "v1", "new_sqlite_classes": ["Box"]}],
            }
        )
    )
    options = ContainerOptions(
        class_name="Box",
        default_port=None,
        required_ports=(),
        sleep_after=3600,
        sleep_mode="stop",
        stop_paused_after=3600,
        env_vars={},
        entrypoint=tuple(SLEEPS),
        enable_internet=True,
        readiness=Readiness("ping", 5, 1, 0.05),
        start_timeout=30,
        stop_timeout=1,
        start_boost=False,
    )
    manager = ContainerManager(
        remote,
        load_config(project),
        ContainerSettings(stop_grace=1),
        owner=node.owner,
        images={"Box": allowed_ref},
    )
    await manager.start()
    supervisor = manager.supervisor("Box", "obj-1", None)
    supervisor.attach(_Hooks(), options, lambda state: None, None)
    await supervisor.start(None, StartOverrides())
    assert supervisor.phase is Phase.RUNNING and supervisor.info is not None
    [seen] = await docker_runtime.list(node.labels)
    assert seen.id == supervisor.info.id and seen.labels[labels.OBJECT] == "obj-1"

    # The supervisor watches through the `wait` long poll: a kill behind its back shows.
    await docker_runtime.kill(seen.id)

    async def stopped() -> bool:
        return supervisor.phase is Phase.STOPPED

    await wait_until(stopped)
    await supervisor.start(None, StartOverrides())
    assert supervisor.info is not None and supervisor.info.id != seen.id
    await manager.stop()
    assert await docker_runtime.list(node.labels) == []


async def test_a_malformed_call_is_refused_before_the_engine(node: Node) -> None:
    connector = aiohttp.UnixConnector(path=str(node.socket_path))
    async with aiohttp.ClientSession(connector=connector) as session:
        bodies = {
            # An id that would walk the engine's URL space from containers/<id>/...
            "inspect": {"container_id": "../images/json?x="},
            "kill": {"container_id": 12},
            "list": {"labels": {"a": 1}},
            "stop": {"container_id": "abc", "grace_period": float("inf")},
            "run": {"image": "x", "privileged": True},
        }
        for method, body in bodies.items():
            async with session.post(f"http://node/v1/{method}", data=json.dumps(body)) as resp:
                assert resp.status == 400, method
                error = (await resp.json())["error"]
                assert error["type"] == "ContainerError"
                assert error["message"].startswith(f"Bad request to /v1/{method}: ")


# Registry: push and pull


@pytest_asyncio.fixture
async def registry(tmp_path: Path) -> AsyncIterator[str]:
    """Debian's docker-registry on a free loopback port, without auth; its address."""
    port = _free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'storage'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/docker-registry",
        "serve",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/v2/") as resp:
                        return resp.status == 200
                return False

            await wait_until(ready, within=15)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        await proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
async def test_push_gives_the_digest_and_pull_by_digest_fetches_it(
    docker_runtime: DockerRuntime, busybox_image: str, registry: str
) -> None:
    repo = f"{registry}/engine-api/busybox"
    ref = f"{repo}:{secrets.token_hex(4)}"
    await docker_cli("tag", busybox_image, ref)
    made = [ref]
    try:
        progress: list[dict[str, Any]] = []
        digest = await docker_runtime.push(ref, None, progress.append)
        assert digest.startswith("sha256:") and len(digest) == 71
        assert any("digest: " + digest in str(p.get("status")) for p in progress)

        # Without the pushed tag, the engine has to ask the registry for the manifest.
        await docker_cli("image", "rm", made.pop())
        pulled = f"{repo}@{digest}"
        made.append(pulled)
        image_id = await docker_runtime.pull(pulled)
        assert image_id == await docker_runtime.image_id(busybox_image)
        assert await docker_runtime.image_id(pulled) == image_id

        missing = f"{repo}@sha256:{'0' * 64}"
        with pytest.raises(ImageError) as caught:
            await docker_runtime.pull(missing)
        assert str(caught.value).startswith(
            f"Could not pull {missing}: the registry at {registry} has no such image or digest ("
        )
        with pytest.raises(ImageError, match=f"push {registry}/engine-api/none:1: the engine"):
            await docker_runtime.push(f"{registry}/engine-api/none:1")
    finally:
        if made:
            await docker_cli("image", "rm", *made)


async def test_pull_and_push_name_a_registry_that_does_not_answer(
    docker_runtime: DockerRuntime, busybox_image: str
) -> None:
    nowhere = f"127.0.0.1:{_free_port()}"
    with pytest.raises(ImageError) as caught:
        await docker_runtime.pull(f"{nowhere}/app/web@sha256:{'1' * 64}")
    assert f"the registry at {nowhere} cannot be reached" in str(caught.value)
    ref = f"{nowhere}/app/web:{secrets.token_hex(4)}"
    await docker_cli("tag", busybox_image, ref)
    try:
        with pytest.raises(ImageError, match=f"push {ref}: the registry at {nowhere} cannot"):
            await docker_runtime.push(ref)
    finally:
        await docker_cli("image", "rm", ref)
    # The engine itself gone stays an engine outage, not an image problem.
    async with DockerRuntime("unix:///nonexistent/docker.sock") as down:
        with pytest.raises(EngineUnavailable):
            await down.pull(f"{nowhere}/app/web@sha256:{'1' * 64}")
        with pytest.raises(EngineUnavailable):
            await down.push(ref)
