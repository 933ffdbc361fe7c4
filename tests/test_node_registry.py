"""The node's registry: the real docker-registry binary, the real engine, real sockets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import resource
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from dockyard.errors import DockyardError
from dockyard.node.registry import Registry
from tests.support.engine import docker_cli, wait_until
from tests.support.registry import serving_proxy

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/docker-registry").exists(), reason="needs docker-registry (scripts/setup)"
)

ADMIN = "dy_admin_" + secrets.token_hex(8)
READ = "dy_read_" + secrets.token_hex(8)
TOKENS = {ADMIN: "admin", READ: "read"}


@pytest_asyncio.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    async with Registry(tmp_path / "registry") as running:
        yield running


@pytest_asyncio.fixture
async def proxy(registry: Registry) -> AsyncIterator[str]:
    """An admin app on 127.0.0.1 that mounts the proxy as the node's API does; its address."""
    async with serving_proxy(registry, TOKENS.get) as address:
        yield address


async def _status(url: str) -> int | None:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return resp.status
    except aiohttp.ClientConnectionError:
        return None


def _rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.slow
async def test_start_serves_v2_on_loopback_and_a_restart_keeps_the_port(tmp_path: Path) -> None:
    directory = tmp_path / "registry"
    first = Registry(directory)
    await first.start()
    address = first.address
    assert address.startswith("127.0.0.1:")
    assert await _status(f"http://{address}/v2/") == 200
    config = json.loads((directory / "config.yml").read_text())
    assert config["http"]["relativeurls"] is True
    assert config["storage"]["delete"] == {"enabled": True}
    assert config["storage"]["filesystem"]["rootdirectory"] == str(directory / "storage")
    assert (directory / "port").read_text().strip() == address.split(":")[1]
    assert "listening on " + address in (directory / "registry.log").read_text()
    pid = first.pid
    assert pid is not None
    await first.stop()
    assert first.pid is None
    assert await _status(f"http://{address}/v2/") is None
    assert not await asyncio.to_thread(Path(f"/proc/{pid}").exists)
    await first.stop()  # a no-op once stopped

    async with Registry(directory) as second:
        assert second.address == address
        assert await _status(f"http://{address}/v2/") == 200


@pytest.mark.slow
async def test_the_registry_comes_back_after_being_killed(registry: Registry) -> None:
    killed = registry.pid
    assert killed is not None
    os.kill(killed, 9)

    async def back() -> bool:
        return registry.pid not in (None, killed) and (
            await _status(f"http://{registry.address}/v2/") == 200
        )

    await wait_until(back, within=15)


_NODE = """
import asyncio, sys
from pathlib import Path
from dockyard.node.registry import Registry

async def main():
    registry = Registry(Path(sys.argv[1]))
    await registry.start()
    print(registry.pid, registry.address, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # not reaped yet
    except FileNotFoundError:
        return True


@pytest.mark.slow
async def test_a_sigkilled_node_takes_its_registry_along_and_the_port_stays(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "registry"
    node = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _NODE, str(directory), stdout=asyncio.subprocess.PIPE
    )
    assert node.stdout is not None
    pid_text, address = (await asyncio.wait_for(node.stdout.readline(), 30)).decode().split()
    pid = int(pid_text)
    node.kill()
    await node.wait()

    async def registry_gone() -> bool:
        return _gone(pid)

    try:
        await wait_until(registry_gone, within=10)
        # A zombie leader can still have threads exiting that hold the socket a moment
        # longer: start waits for its remembered port rather than moving at once.
        async with Registry(directory) as again:
            assert again.address == address
    finally:
        if not _gone(pid):  # the registry outlived its node: do not leave it running
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
async def test_a_registry_whose_port_stays_taken_moves_to_another(tmp_path: Path) -> None:
    directory = tmp_path / "registry"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        directory.mkdir()
        (directory / "port").write_text(f"{taken}\n")
        async with Registry(directory) as moved:
            port = int(moved.address.split(":")[1])
            assert port != taken
            assert (directory / "port").read_text() == f"{port}\n"
            assert await _status(f"http://{moved.address}/v2/") == 200


async def test_a_missing_binary_says_to_run_setup(tmp_path: Path) -> None:
    missing = Registry(tmp_path / "registry", binary=str(tmp_path / "no-docker-registry"))
    with pytest.raises(DockyardError, match="is not installed: run scripts/setup"):
        await missing.start()


async def test_a_registry_that_exits_on_start_is_an_error_and_its_errors_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    binary = tmp_path / "fake-registry"
    binary.write_text(
        "#!/bin/sh\n"
        "echo 'level=info msg=\"starting\"'\n"
        "echo 'level=error msg=\"response completed with error\" http.response.status=404'\n"
        "echo 'level=fatal msg=\"listen tcp: address already in use\"'\n"
        "exit 1\n"
    )
    binary.chmod(0o755)
    broken = Registry(tmp_path / "registry", binary=str(binary))
    log = tmp_path / "registry" / "registry.log"
    with pytest.raises(DockyardError, match=re.escape(f"exited with 1 on start; see {log}")):
        await broken.start()
    assert broken.pid is None
    assert log.read_text().count("\n") == 3
    forwarded = [r.getMessage() for r in caplog.records if r.name == "dockyard.node.registry"]
    assert forwarded == ['registry: level=fatal msg="listen tcp: address already in use"']


@pytest.mark.slow
async def test_the_proxy_asks_for_a_token_and_limits_read_tokens(proxy: str) -> None:
    base = f"http://{proxy}/v2/"
    async with aiohttp.ClientSession() as session:
        for auth in (None, _basic("x", "wrong"), "Bearer wrong", "Basic !!!", _basic("x", "")):
            headers = {"Authorization": auth} if auth else {}
            async with session.get(base, headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == 'Basic realm="dockyard"'
                body = await resp.json()
                assert body["errors"][0]["code"] == "UNAUTHORIZED"
        for auth in (_basic("anyone", ADMIN), f"Bearer {ADMIN}", _basic("x", READ)):
            async with session.get(base, headers={"Authorization": auth}) as resp:
                assert resp.status == 200
                assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        upload = f"{base}t/readonly/blobs/uploads/"
        async with session.post(upload, headers={"Authorization": _basic("x", READ)}) as resp:
            assert resp.status == 403
            assert (await resp.json())["errors"][0]["code"] == "DENIED"
        async with session.post(upload, headers={"Authorization": _basic("x", ADMIN)}) as resp:
            assert resp.status == 202
            # Relative, so it holds through the proxy whatever the client called it.
            assert resp.headers["Location"].startswith("/v2/t/readonly/blobs/uploads/")
            assert resp.headers["Docker-Upload-UUID"]


@pytest.mark.slow
async def test_a_large_chunked_upload_streams_through_the_proxy(
    registry: Registry, proxy: str
) -> None:
    size, piece = 96 * 1024 * 1024, os.urandom(1024 * 1024)
    digest = hashlib.sha256(piece * (size // len(piece))).hexdigest()
    auth = {"Authorization": f"Bearer {ADMIN}"}
    repo = f"t/big-{secrets.token_hex(4)}"

    rss: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(piece)):
            rss.append(_rss())
            yield piece

    before = _rss()
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(f"http://{proxy}") as session:
        async with session.post(f"/v2/{repo}/blobs/uploads/", headers=auth) as resp:
            assert resp.status == 202
            location = resp.headers["Location"]
        started = loop.time()
        # No Content-Length: the client sends it chunked, and so does the proxy.
        async with session.patch(location, data=body(), headers=auth) as resp:
            assert resp.status == 202, await resp.text()
            assert resp.headers["Range"] == f"0-{size - 1}"
            location = resp.headers["Location"]
        elapsed = loop.time() - started
        sep = "&" if "?" in location else "?"
        async with session.put(f"{location}{sep}digest=sha256:{digest}", headers=auth) as resp:
            assert resp.status == 201, await resp.text()
            assert resp.headers["Docker-Content-Digest"] == f"sha256:{digest}"
        blob = f"/v2/{repo}/blobs/sha256:{digest}"
        async with session.head(blob, headers=auth) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(size)
        hasher, received = hashlib.sha256(), 0
        async with session.get(blob, headers=auth) as resp:
            async for chunk in resp.content.iter_any():
                rss.append(_rss())
                hasher.update(chunk)
                received += len(chunk)
        assert (received, hasher.hexdigest()) == (size, digest)
    grown_mib = (max(rss) - before) / 2**20
    print(
        f"upload {size >> 20} MiB through the proxy: {size / elapsed / 2**20:.0f} MiB/s, "
        f"peak RSS grew {grown_mib:.1f} MiB"
    )
    assert grown_mib < 48  # the body was never held whole (client + proxy share this process)


async def _docker(config: Path, *args: str, stdin: str | None = None) -> tuple[int, str]:
    """The docker CLI with its own config dir (logins stay out of ~/.docker)."""
    proc = await asyncio.create_subprocess_exec(
        "docker",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "DOCKER_CONFIG": str(config)},
    )
    out, _ = await proc.communicate(stdin.encode() if stdin is not None else None)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _login(config: Path, proxy: str, token: str) -> tuple[int, str]:
    return await _docker(config, "login", proxy, "-u", "x", "--password-stdin", stdin=token)


@pytest.mark.slow
@pytest.mark.docker
async def test_docker_logs_in_pushes_and_pulls_then_prune_removes_it(
    registry: Registry, proxy: str, busybox_image: str, tmp_path: Path
) -> None:
    config = tmp_path / "docker-config"
    repo = f"t/x{secrets.token_hex(4)}"
    pushed = f"{proxy}/{repo}:1"
    made = [pushed]
    try:
        code, out = await _login(config, proxy, "no")
        assert code != 0 and "unauthorized" in out.lower(), out
        code, out = await _login(config, proxy, ADMIN)
        assert code == 0 and "Login Succeeded" in out, out

        await docker_cli("tag", busybox_image, pushed)
        code, out = await _docker(config, "push", pushed)
        assert code == 0, out
        digest = out.split("digest: ")[1].split()[0]
        assert await registry.manifest_digest(repo, "1") == digest
        assert await registry.manifest_digest(repo, digest) == digest
        assert await registry.manifest_digest(repo, "2") is None

        # The engine pulls by digest straight from the registry, without credentials.
        by_digest = f"{registry.address}/{repo}@{digest}"
        made.append(by_digest)
        code, out = await _docker(config, "pull", by_digest)
        assert code == 0, out
        assert await docker_cli("image", "inspect", "-f", "{{.Id}}", by_digest) == (
            await docker_cli("image", "inspect", "-f", "{{.Id}}", busybox_image)
        )

        second = f"{proxy}/{repo}-b:2"
        made.append(second)
        await docker_cli("tag", busybox_image, second)
        code, out = await _docker(config, "push", second)
        assert code == 0, out
        catalog = await registry.catalog()
        assert [(e.repo, e.tags, e.digest) for e in catalog] == [
            (repo, ("1",), digest),
            (f"{repo}-b", ("2",), digest),
        ]
        assert catalog[0].size == catalog[1].size > 700_000  # busybox's layer, compressed
        assert await registry.catalog(page_size=1) == catalog  # follows the Link pages

        # A read token pulls but cannot push.
        code, out = await _docker(config, "logout", proxy)
        assert code == 0, out
        code, out = await _login(config, proxy, READ)
        assert code == 0, out
        denied = f"{proxy}/{repo}-denied:1"
        made.append(denied)
        await docker_cli("tag", busybox_image, denied)
        started = asyncio.get_running_loop().time()
        code, out = await _docker(config, "push", denied)
        # A denial docker can tell from a transient error: it gives up at once (a bare
        # DENIED code made it retry each layer five times, about 50 s).
        assert code != 0 and "denied: a read token may only pull" in out, out
        assert "Retrying" not in out
        print(f"denied push: {asyncio.get_running_loop().time() - started:.2f} s")
        assert await registry.manifest_digest(f"{repo}-denied", "1") is None

        blobs = registry.directory / "storage/docker/registry/v2/blobs"
        stored = sum(1 for p in blobs.rglob("data"))
        await registry.delete(repo, digest)
        await registry.delete(repo, digest)  # already gone: a no-op
        assert await registry.manifest_digest(repo, digest) is None
        assert [e.repo for e in await registry.catalog()] == [f"{repo}-b"]
        await registry.delete(f"{repo}-b", digest)
        assert await registry.catalog() == []
        output = await registry.garbage_collect()
        assert "blob eligible for deletion" in output
        assert sum(1 for p in blobs.rglob("data")) < stored
        # Writable again afterwards.
        code, out = await _docker(config, "logout", proxy)
        code, out = await _login(config, proxy, ADMIN)
        assert code == 0, out
        code, out = await _docker(config, "push", pushed)
        assert code == 0, out
    finally:
        await _docker(config, "logout", proxy)
        code, out = await _docker(config, "image", "rm", *made)
        assert code == 0, out
