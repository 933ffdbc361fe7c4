"""The node-owned container supervisor, through a real ``dockyard dev`` on the real engine:
cancellation never pins a container, a cancelled caller never fails a shared start,
a reload never duplicates a container, and user code never collides with internals."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from dockyard.containers.docker import DockerRuntime
from dockyard.containers.runtime import ContainerInfo
from tests.support.devserver import DevServer
from tests.support.engine import app_name, engine_inspect, wait_until
from tests.support.projects import IMAGES

pytestmark = pytest.mark.docker

WORKER = """
import asyncio
import json

from dockyard import Container, Request, Response, get_container


class Web(Container):
    default_port = 8080
    sleep_after = {sleep_after!r}

    async def keys(self):
        return list((await self.ctx.storage.list()).keys())

    async def wipe_then_schedule(self):
        kept = await self.schedule(3600, "mine")
        await self.ctx.storage.put("a", 1)
        await self.ctx.storage.delete_all()
        row = await self.schedule(7200, "mine")
        alarm = await self.ctx.storage.get_alarm()
        listed = [s.id for s in await self.list_schedules()]
        # The schedule made before the wipe is kept, and the alarm is set for it.
        return listed == [kept.id, row.id] and alarm == kept.time * 1000

    async def status(self):
        return (await self.get_state()).status


class Big(Web):
    pass


class Loose(Web):
    cap_add = ["NET_RAW"]
    pids_limit = 64
    read_only_root = True


class Mine(Web):
    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        # A user's own attributes, named as a framework might name its own.
        self._state = "mine"
        self._handle = "mine"
        self._inflight = "mine"
        self._schedules = "mine"

    async def mine(self):
        return [self._state, self._handle, self._inflight, self._schedules]


class Slow(Web):
    # Its port answers only 4 s after it starts: a long, shared cold start.
    entrypoint = ["sh", "-c", "sleep 4 && exec httpd -f -p 8080 -h /www"]


async def fetch(request, env, ctx):
    parts = request.path.strip("/").split("/")
    kind, binding, name = parts[0], getattr(env, parts[1]), parts[2]
    stub = get_container(binding, name)
    if kind == "rpc":
        return Response.json(await getattr(stub, parts[3])())
    url = "http://container/" + "/".join(parts[3:])
    if request.query_string:
        url += "?" + request.query_string
    body = request.stream() if request.has_body else None
    forwarded = Request(url, method=request.method, headers=request.headers, body=body)
    timeout = request.headers.get("x-worker-timeout")
    if timeout:
        # A worker that gives up on the container (Cloudflare code does this).
        try:
            async with asyncio.timeout(float(timeout)):
                return await stub.fetch(forwarded)
        except TimeoutError:
            return Response("worker gave up\\n", status=504)
    return await stub.fetch(forwarded)
"""


def write_project(
    root: Path, *, sleep_after: str = "10m", classes: dict | None = None, name: str | None = None
) -> str:
    name = name or app_name()
    root.mkdir(parents=True, exist_ok=True)
    (root / "worker.py").write_text(WORKER.format(sleep_after=sleep_after))
    shutil.copytree(IMAGES / "web", root / "web", dirs_exist_ok=True)
    classes = classes or {"Web": {}}
    config = {
        "name": name,
        "main": "worker.py",
        "containers": [
            {"class_name": c, "image": "./web/Dockerfile", **extra} for c, extra in classes.items()
        ],
        "durable_objects": {"bindings": [{"name": c.upper(), "class_name": c} for c in classes]},
        "migrations": [{"tag": "v1", "new_sqlite_classes": list(classes)}],
    }
    (root / "wrangler.jsonc").write_text(json.dumps(config, indent=2))
    return name


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def running(runtime: DockerRuntime, app: str, **labels: str) -> list[ContainerInfo]:
    infos = await runtime.list({"dockyard.app": app, **labels})
    return [i for i in infos if i.running]


async def test_clients_that_leave_mid_response_or_mid_upload_do_not_pin_the_container(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    app = write_project(tmp_path / "app", sleep_after="2s")
    with DevServer(tmp_path / "app") as dev:
        host, port = dev.url.removeprefix("http://").split(":")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{dev.url}/c/WEB/w/") as response:
                assert response.status == 200
        # Mid-response: ask for the 50 MB file, read a little, vanish.
        for _ in range(8):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"GET /c/WEB/w/big HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.recv(65536)
        # Mid-upload: announce 10 MB, send 1 KB, vanish.
        for _ in range(8):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    b"POST /c/WEB/w/cgi-bin/count HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: 10000000\r\n\r\n" + b"x" * 1024
                )
        assert await running(docker_runtime, app, **{"dockyard.object_name": "w"})
        left = time.monotonic()

        async def asleep() -> bool:
            return not await running(docker_runtime, app)

        await wait_until(asleep, within=2 + 2 + 5)
        # sleep_after 2 s, plus the stop itself: well under the 10 s it took to fail before.
        assert time.monotonic() - left < 2 + 2 + 5


async def test_a_worker_timeout_mid_request_does_not_pin_the_container(
    tmp_path: Path,
    busybox_image: str,
    docker_runtime: DockerRuntime,
    session: aiohttp.ClientSession,
) -> None:
    app = write_project(tmp_path / "app", sleep_after="2s")
    with DevServer(tmp_path / "app") as dev:
        async with session.get(f"{dev.url}/c/WEB/t/") as response:
            assert response.status == 200
        for _ in range(5):
            async with session.get(
                f"{dev.url}/c/WEB/t/cgi-bin/slow?2", headers={"x-worker-timeout": "0.2"}
            ) as response:
                assert response.status == 504

        async def asleep() -> bool:
            return not await running(docker_runtime, app)

        await wait_until(asleep, within=2 + 2 + 5)


async def test_a_cancelled_first_caller_does_not_fail_the_shared_cold_start(
    tmp_path: Path,
    busybox_image: str,
    docker_runtime: DockerRuntime,
    session: aiohttp.ClientSession,
) -> None:
    app = write_project(tmp_path / "app", classes={"Slow": {}})
    with DevServer(tmp_path / "app") as dev:
        # The first caller begins the start and gives up after 3 s; the port answers
        # only 4 s after the container started. The others ask while that start is under
        # way (the container runs, its port is not up yet) and must all be answered.
        first = asyncio.create_task(
            session.get(f"{dev.url}/c/SLOW/cold/", headers={"x-worker-timeout": "3"})
        )

        async def started() -> bool:
            return bool(await running(docker_runtime, app))

        await wait_until(started, within=10, interval=0.01)
        assert not first.done()
        others = [asyncio.create_task(session.get(f"{dev.url}/c/SLOW/cold/")) for _ in range(5)]
        async with await first as response:
            assert response.status == 504
        for task in others:
            async with await asyncio.wait_for(task, 20) as response:
                assert response.status == 200, await response.text()
                assert await response.text() == "hello from the container\n"


async def test_user_attributes_and_storage_do_not_collide_with_internals(
    tmp_path: Path, busybox_image: str, session: aiohttp.ClientSession
) -> None:
    write_project(tmp_path / "app", classes={"Mine": {}})
    with DevServer(tmp_path / "app") as dev:
        async with session.get(f"{dev.url}/c/MINE/u/") as response:
            assert response.status == 200, await response.text()
        async with session.get(f"{dev.url}/rpc/MINE/u/mine") as response:
            assert await response.json() == ["mine"] * 4
        async with session.get(f"{dev.url}/rpc/MINE/u/status") as response:
            assert await response.json() == "healthy"
        async with session.get(f"{dev.url}/rpc/MINE/u/keys") as response:
            assert await response.json() == []
        async with session.get(f"{dev.url}/rpc/MINE/u/wipe_then_schedule") as response:
            assert response.status == 200, await response.text()
            assert await response.json() is True
        async with session.get(f"{dev.url}/c/MINE/u/") as response:
            assert response.status == 200


async def test_an_instance_type_beyond_the_host_is_capped_with_one_warning(
    tmp_path: Path, busybox_image: str, session: aiohttp.ClientSession
) -> None:
    write_project(tmp_path / "app", classes={"Big": {"instance_type": "standard-4"}})
    with DevServer(tmp_path / "app") as dev:
        async with session.get(f"{dev.url}/c/BIG/b/") as response:
            assert response.status == 200, await response.text()
        cpus = os.cpu_count() or 1
        if cpus < 4:
            dev.wait_for(r"asks for 4 vCPU")
            assert dev.output.count("asks for 4 vCPU") == 1


@pytest.mark.slow
async def test_hot_reload_under_load_never_duplicates_a_container(
    tmp_path: Path,
    busybox_image: str,
    docker_runtime: DockerRuntime,
    session: aiohttp.ClientSession,
) -> None:
    app = write_project(tmp_path / "app", classes={"Web": {"max_instances": 1}})
    worker = tmp_path / "app" / "worker.py"
    source = worker.read_text()
    with DevServer(tmp_path / "app") as dev:
        statuses: list[int] = []
        most: list[int] = []
        done = asyncio.Event()

        loop = asyncio.get_running_loop()

        async def load() -> None:
            # 50 requests/s for 10 s, to one object (max_instances: 1).
            begin = loop.time()
            for i in range(500):
                async with session.get(f"{dev.url}/c/WEB/one/") as response:
                    statuses.append(response.status)
                    await response.read()
                if i % 25 == 0:
                    most.append(len(await running(docker_runtime, app)))
                await asyncio.sleep(max(0.0, begin + (i + 1) * 0.02 - loop.time()))
            done.set()

        def reloads() -> int:
            return dev.output.count("Reloaded the worker")

        # The file watcher starts just after "Ready": edit until it sees one.
        async def watching() -> bool:
            worker.write_text(source + f"\n# warm-up {time.monotonic()}\n")
            return await asyncio.to_thread(dev.output.count, "Reloaded the worker") > 0

        await wait_until(watching, within=10, interval=0.5)

        async def reload() -> None:
            # 20 edits spread over the 10 s of load, each waited for until it took effect.
            for i in range(20):
                before = reloads()
                worker.write_text(source + f"\n# edit {i}\n")

                async def took_effect(before: int = before) -> bool:
                    return reloads() > before

                await wait_until(took_effect, within=10)
                await asyncio.sleep(0.3)  # paces the edits; no race depends on it

        await asyncio.gather(load(), reload())
        assert done.is_set()
        bad = [s for s in statuses if not 200 <= s < 300]
        assert bad == [], f"{len(bad)} of {len(statuses)} requests failed: {set(bad)}"
        assert max(most) == 1
        assert len(await running(docker_runtime, app)) == 1


async def test_two_projects_with_the_same_name_never_touch_each_others_containers(
    tmp_path: Path,
    busybox_image: str,
    docker_runtime: DockerRuntime,
    session: aiohttp.ClientSession,
) -> None:
    app = write_project(tmp_path / "a")
    write_project(tmp_path / "b", name=app)
    with DevServer(tmp_path / "a") as first:
        async with session.get(f"{first.url}/c/WEB/x/") as response:
            assert response.status == 200
        [mine] = await running(docker_runtime, app)
        with DevServer(tmp_path / "b") as second:
            async with session.get(f"{second.url}/c/WEB/x/") as response:
                assert response.status == 200
            both = {i.id for i in await running(docker_runtime, app)}
            assert mine.id in both and len(both) == 2
        # The second one's exit stopped its own container, not the first one's.
        assert [i.id for i in await running(docker_runtime, app)] == [mine.id]
        async with session.get(f"{first.url}/c/WEB/x/") as response:
            assert response.status == 200
        assert [i.id for i in await running(docker_runtime, app)] == [mine.id]
    assert await running(docker_runtime, app) == []


async def test_started_containers_carry_the_hardening_defaults_and_class_overrides(
    tmp_path: Path,
    busybox_image: str,
    docker_runtime: DockerRuntime,
    session: aiohttp.ClientSession,
) -> None:
    app = write_project(tmp_path / "app", classes={"Web": {}, "Loose": {}})
    with DevServer(tmp_path / "app") as dev:
        for binding in ("WEB", "LOOSE"):
            async with session.get(f"{dev.url}/c/{binding}/h/") as response:
                assert response.status == 200
        found = {
            i.labels["dockyard.class"]: await engine_inspect(i.id)
            for i in await running(docker_runtime, app)
        }
    strict, loose = found["Web"]["HostConfig"], found["Loose"]["HostConfig"]
    assert strict["SecurityOpt"] == ["no-new-privileges:true"]
    assert "NET_RAW" in strict["CapDrop"] and not strict["CapAdd"]
    assert strict["PidsLimit"] == 512 and strict["ReadonlyRootfs"] is False
    assert strict["LogConfig"]["Config"] == {"max-file": "3", "max-size": "10m"}
    assert loose["CapAdd"] == ["NET_RAW"] and loose["PidsLimit"] == 64
    assert loose["ReadonlyRootfs"] is True


async def test_containers_cli_escapes_control_characters_in_object_names(
    tmp_path: Path,
    busybox_image: str,
    session: aiohttp.ClientSession,
) -> None:
    write_project(tmp_path / "app")
    hostile = "%1B%5B2J%1B%5D0%3Bowned%07x"  # clear screen, set the title, BEL
    with DevServer(tmp_path / "app") as dev:
        async with session.get(f"{dev.url}/c/WEB/{hostile}/") as response:
            assert response.status == 200
        listed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "dockyard", "containers", "list"],
            cwd=tmp_path / "app",
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
    assert listed.returncode == 0, listed.stderr
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout
    assert r"\x1b[2J\x1b]0;owned\x07x" in listed.stdout
