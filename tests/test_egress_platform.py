"""Egress control on a node (`dockyard serve`): the app process is unprivileged and reaches
the engine through the node's engine API, so the node makes the listener inside the
container and hands it to the app over the app's egress socket (SCM_RIGHTS); the proxy
and the handlers then run in the app process. Real engine, real unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dockyard.app import App
from dockyard.containers import labels
from dockyard.containers.docker import DockerRuntime
from dockyard.containers.egress_handoff import egress_socket_path
from dockyard.containers.remote import RemoteRuntime
from dockyard.containers.runtime import ContainerSpec
from dockyard.errors import ContainerError, ContainerGone
from dockyard.node.engine_api import EngineApi
from dockyard.settings import ContainerSettings, Settings
from tests.support.engine import docker_cli
from tests.test_egress_engine import CLASSES, Lab, RootlessRuntime, write_project

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="egress control needs root (setns)"),
]

SLEEPS = ["sh", "-c", "while :; do sleep 0.1; done"]


@pytest.fixture
def image(busybox_tag: str) -> str:
    return busybox_tag


@contextlib.asynccontextmanager
async def serving(listener: socket.socket, line: bytes) -> AsyncIterator[None]:
    """Answer each connection on ``listener`` with ``line``, once it sent a line."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(line)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, sock=listener)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def spec(image: str, with_labels: dict[str, str], entrypoint: list[str]) -> ContainerSpec:
    """A container of class Web with these labels (app, owner), running ``entrypoint``."""
    return ContainerSpec(
        image=image, labels={**with_labels, labels.CLASS: "Web"}, entrypoint=entrypoint
    )


async def test_the_node_hands_the_app_a_listener_inside_its_own_container_only(
    tmp_path: Path, image: str, docker_runtime: DockerRuntime, test_labels: dict[str, str]
) -> None:
    app = test_labels[labels.APP]
    owner = f"owner-{secrets.token_hex(4)}"
    socket_path = tmp_path / "engine.sock"
    async with EngineApi(docker_runtime, owner) as api, RemoteRuntime(socket_path) as remote:
        await api.open(app, socket_path, lambda: {image}, None)
        assert remote.egress_listeners is None
        assert oct(egress_socket_path(socket_path).stat().st_mode & 0o777) == "0o600"
        mine = await remote.run(spec(image, {labels.APP: app, labels.OWNER: owner}, SLEEPS))
        listener = await remote.listen_in_container(mine.id, 15080)

        async with serving(listener, b"served by the app process\n"):
            result = await remote.exec(mine.id, ["sh", "-c", "echo hi | nc -w 5 127.0.0.1 15080"])
            assert (result.exit_code, result.stdout) == (0, b"served by the app process\n")

        # Another app's container (same node) is "no such container", as for every call.
        other = await docker_runtime.run(
            spec(image, {**test_labels, labels.OWNER: "someone-else"}, SLEEPS)
        )
        with pytest.raises(ContainerGone, match="does not exist"):
            await remote.listen_in_container(other.id, 15080)
        await api.close(app)
        assert not egress_socket_path(socket_path).exists()


async def test_the_node_hands_the_app_a_connection_inside_its_own_container_only(
    tmp_path: Path, image: str, docker_runtime: DockerRuntime, test_labels: dict[str, str]
) -> None:
    app = test_labels[labels.APP]
    owner = f"owner-{secrets.token_hex(4)}"
    socket_path = tmp_path / "engine.sock"
    # A server on the container's loopback only: no published port could reach it.
    serves_inside = [
        "sh",
        "-c",
        "echo inside > /index.html && exec httpd -f -p 127.0.0.1:8080 -h /",
    ]
    async with EngineApi(docker_runtime, owner) as api, RemoteRuntime(socket_path) as remote:
        await api.open(app, socket_path, lambda: {image}, None)
        assert remote.namespace_connections is None
        mine = await remote.run(spec(image, {labels.APP: app, labels.OWNER: owner}, serves_inside))
        answer = b""
        for _ in range(100):  # until httpd listens
            try:
                sock = await remote.connect_in_container(mine.id, 8080)
            except (OSError, ContainerError):  # (refused there: ContainerError)
                await asyncio.sleep(0.05)
                continue
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /index.html HTTP/1.0\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            break
        assert answer.startswith(b"HTTP/1.") and answer.endswith(b"inside\n"), answer
        # Nothing listens there: an answer the app falls back on (the published port).
        with pytest.raises(ContainerError, match="nothing accepts connections on port 9"):
            await remote.connect_in_container(mine.id, 9)

        other = await docker_runtime.run(
            spec(image, {**test_labels, labels.OWNER: "someone-else"}, serves_inside)
        )
        with pytest.raises(ContainerGone, match="does not exist"):
            await remote.connect_in_container(other.id, 8080)


async def test_the_next_process_of_an_app_listens_beside_the_one_it_replaces(
    image: str, docker_runtime: DockerRuntime, test_labels: dict[str, str]
) -> None:
    """A reload on a node: the new app process adopts the running container and opens its
    egress listener while the old process still holds its own, until it ends."""
    container = await docker_runtime.run(spec(image, test_labels, SLEEPS))
    old = await docker_runtime.listen_in_container(container.id, 15080)
    try:
        new = await docker_runtime.listen_in_container(container.id, 15080)
    finally:
        old.close()  # the old process ends

    async with serving(new, b"served by the new process\n"):
        for _ in range(3):
            result = await docker_runtime.exec(
                container.id, ["sh", "-c", "echo hi | nc -w 5 127.0.0.1 15080"]
            )
            assert (result.exit_code, result.stdout) == (0, b"served by the new process\n")


async def test_a_node_that_cannot_listen_serves_no_egress_socket(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    socket_path = tmp_path / "engine.sock"
    async with RootlessRuntime() as rootless, EngineApi(rootless, "owner") as api:
        await api.open(test_labels[labels.APP], socket_path, set, None)
        assert not egress_socket_path(socket_path).exists()
        async with RemoteRuntime(socket_path) as remote:
            assert "root beside a local engine" in (remote.egress_listeners or "")


@pytest.mark.slow
async def test_an_app_over_the_engine_api_applies_its_egress_rules(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    """The whole path of `dockyard serve`, in one process: App -> RemoteRuntime -> the
    node's EngineApi -> the engine; the proxy and the handler run on the App's side."""
    name = write_project(tmp_path / "app")
    ref = f"dockyard-{name}:egress"
    await docker_runtime.build_image(
        tmp_path / "app" / "container", Path("Dockerfile"), ref, {}, lambda line: None
    )
    origin = await asyncio.start_server(_origin, "127.0.0.1", 0)
    port = origin.sockets[0].getsockname()[1]
    owner = f"owner-{secrets.token_hex(4)}"
    socket_path = tmp_path / "run" / "engine.sock"
    socket_path.parent.mkdir()
    try:
        async with EngineApi(docker_runtime, owner) as api:
            await api.open(name, socket_path, lambda: {ref}, None)
            app = App(
                tmp_path / "app",
                settings=Settings(
                    state_dir=tmp_path / "state",
                    containers=ContainerSettings(
                        stop_grace=2.0, egress_hosts={"allowed.test": f"127.0.0.1:{port}"}
                    ),
                ),
                runtime=RemoteRuntime(socket_path),
                owner=owner,
                image_overrides=dict.fromkeys(CLASSES, ref),
            )
            await app.start()
            try:
                lab = Lab(app)
                ok = await lab.get("ALLOWING", "n", "http://allowed.test/x")
                assert (ok.status, ok.body) == (200, "origin saw /x\n"), ok
                assert (await lab.get("ALLOWING", "n", "http://other.test/")).status == 520
                handled = await lab.get(
                    "ALLOWING", "n", "http://api.internal/y", "x-from-container: n"
                )
                assert handled.headers["x-handled-by"] == "worker"
                assert handled.body == "worker saw GET http://api.internal/y n\n"
                # Requests reach the container on its own loopback: the node connected.
                peer = await lab.call("ALLOWING", "n", "peer")
                assert peer.strip("[]").removeprefix("::ffff:") == "127.0.0.1", peer
            finally:
                await app.stop()
    finally:
        origin.close()
        await origin.wait_closed()
        for info in await docker_runtime.list({labels.APP: name}):
            await docker_runtime.remove(info.id)
        await docker_cli("image", "rm", "-f", "--no-prune", ref)


async def _origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request_line = (await reader.readline()).decode()
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    body = f"origin saw {request_line.split(' ')[1]}\n".encode()
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    writer.close()
