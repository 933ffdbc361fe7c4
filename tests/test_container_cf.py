"""The Container class as ``@cloudflare/containers`` documents it (issue 11, "Align").

Each test runs on the real engine through one shared `dockyard dev` of a project with a
class per behaviour; every test uses object names of its own. The api image of
tests/test_container_api.py is built once for the module, plus a child that also EXPOSEs
8081 (for container_fetch to a port the class does not declare).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from dockyard.containers.docker import DockerRuntime
from dockyard.containers.runtime import ContainerInfo
from tests.support.api_project import (
    WORKER_HELPERS,
    build_api_images,
    remove_app,
    remove_test_images,
)
from tests.support.devserver import DevServer
from tests.support.engine import wait_until

pytestmark = pytest.mark.docker

TIMEOUT = aiohttp.ClientTimeout(total=30)

# Routes: /rpc/<BINDING>/<name>/<method> (JSON body {"args", "kwargs"}), and
# /cf/<BINDING>/<name>/<port>: container_fetch("/", port), an error's text as 599;
# /random/<BINDING>: awaits get_random; /switch: what switch_port does to a request.
WORKER = (
    r"""
import asyncio

from dockyard import Container, Request, Response, get_container, get_random, switch_port


"""
    + WORKER_HELPERS
    + r"""

class Base(Container):
    default_port = 8080

    async def on_stop(self, params):
        await remember(
            self.ctx.storage,
            "stops",
            [params.exit_code, params.reason, getattr(params, "dockyard_reason", None)],
        )

    async def on_error(self, error):
        await remember(self.ctx.storage, "errors", str(error))
        raise error

    async def recorded(self, key):
        return await self.ctx.storage.get(key) or []

    async def one_arg(self, payload):
        await remember(self.ctx.storage, "calls", ["one_arg", payload])

    async def two_args(self, payload, schedule):
        await remember(self.ctx.storage, "calls", ["two_args", payload, schedule.taskId])

    async def add(self, seconds, callback, payload):
        row = await self.schedule(seconds, callback, payload)
        return {"taskId": row.taskId, "id": row.id, "callback": row.callback,
                "payload": row.payload, "type": row.type,
                "delayInSeconds": row.delayInSeconds, "time": row.time}

    async def schedule_ids(self, *callback):
        return [row.taskId for row in await self.list_schedules(*callback)]

    async def schedule_of(self, task_id):
        row = await self.get_schedule(task_id)
        return None if row is None else [row.taskId, row.callback, row.payload]

    async def state_fields(self):
        state = await self.getState()
        return {"shape": plain(state), "last_change": state.last_change,
                "exit_code": state.exit_code}

    async def env_of_container(self):
        result = await self.exec(["env"])
        return result.stdout.decode().splitlines()


class Stubborn(Base):
    # PID 1 ignores SIGTERM: only SIGKILL ends it.
    stop_timeout = 1.0
    entrypoint = [
        "sh", "-c", "trap '' TERM; httpd -p 8080 -h /www; while true; do sleep 0.2; done"
    ]


class StubbornSleeper(Stubborn):
    sleep_after = 1


class Sleeper(Base):
    sleep_after = 1


class Quitter(Base):
    entrypoint = ["sh", "-c",
                  "httpd -p 8080 -h /www; while [ ! -f /tmp/quit ]; do sleep 0.05; done; exit 3"]


class LatePort(Base):
    # 8081 opens only once /tmp/open-8081 exists.
    required_ports = [8080, 8081]
    entrypoint = [
        "sh", "-c",
        "httpd -p 8080 -h /www; while [ ! -f /tmp/open-8081 ]; do sleep 0.05; done; "
        "exec httpd -f -p 8081 -h /www2",
    ]


class Labeled(Base):
    labels = {"team": "blue", "tier": "web"}


class BadLabels(Base):
    labels = {"dockyard.app": "someone-else"}


class Exposed(Base):
    # The image EXPOSEs 8080 and 8081; the class declares only 8080.
    entrypoint = ["sh", "-c", "httpd -p 8081 -h /www2 && exec httpd -f -p 8080 -h /www"]


class Ported(Container):
    # Cloudflare's names, as a class ported from TypeScript has them.
    default_port = 8080

    async def onStart(self):
        await remember(self.ctx.storage, "starts", (await self.getState()).status)

    def onStop(self, params):
        return remember(self.ctx.storage, "stops", [params.exitCode, params.reason])

    async def recorded(self, key):
        return await self.ctx.storage.get(key) or []


async def fetch(request, env, ctx):
    kind, *rest = request.path.strip("/").split("/")
    if kind == "random":
        stub = await get_random(getattr(env, rest[0]), 2)
        same = get_random(getattr(env, rest[0]), 1)
        return Response.json({"state": plain(await stub.get_state())["status"],
                              "sync": plain(await same.get_state())["status"]})
    if kind == "switch":
        original = Request("http://container/", headers={"x-keep": "1"})
        switched = switch_port(original, 8081)
        return Response.json({
            "same": switched is original,
            "original": dict(original.headers.items()),
            "switched": dict(switched.headers.items()),
        })
    binding, name, *rest = rest
    stub = get_container(getattr(env, binding), name)
    if kind == "rpc":
        body = await request.json()
        try:
            result = await getattr(stub, rest[0])(*body.get("args", []), **body.get("kwargs", {}))
        except Exception as exc:
            return Response(f"{type(exc).__name__}: {exc}", status=599)
        return Response.json(plain(result))
    if kind == "cf":
        try:
            return await stub.container_fetch("/", int(rest[0]))
        except Exception as exc:
            return Response(f"{type(exc).__name__}: {exc}", status=599)
    return await stub.fetch(Request("http://container/" + "/".join(rest)))
"""
)

CLASSES = (
    "Base",
    "Stubborn",
    "StubbornSleeper",
    "Sleeper",
    "Quitter",
    "LatePort",
    "Labeled",
    "BadLabels",
    "Exposed",
    "Ported",
)


@dataclass(frozen=True)
class Shared:
    name: str
    dev: DevServer


def _build_exposing(parent: str, token: str) -> str:
    tag = f"dockyard-test/api:{token}-exposed"
    result = subprocess.run(
        ["docker", "build", "-q", "--label", f"dockyard.test={token}", "-t", tag, "-"],
        input=f"FROM {parent}\nEXPOSE 8081\n",
        capture_output=True,
        text=True,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tag


@pytest.fixture(scope="module")
def shared(busybox_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    token = secrets.token_hex(4)
    name = f"t-cf-{token}"
    try:
        image, _ = build_api_images(token)
        exposing = _build_exposing(image, token)
        root = tmp_path_factory.mktemp("cf")
        (root / "worker.py").write_text(WORKER)
        config = {
            "name": name,
            "main": "worker.py",
            "containers": [
                {"class_name": c, "image": exposing if c == "Exposed" else image} for c in CLASSES
            ],
            "durable_objects": {
                "bindings": [{"name": c.upper(), "class_name": c} for c in CLASSES]
            },
            "migrations": [{"tag": "v1", "new_sqlite_classes": list(CLASSES)}],
        }
        (root / "wrangler.jsonc").write_text(json.dumps(config))
        with DevServer(root) as dev:
            yield Shared(name, dev)
    finally:
        remove_app(name)
        remove_test_images(token)


@dataclass
class Lab:
    session: aiohttp.ClientSession
    runtime: DockerRuntime
    app: str
    url: str

    async def get(self, path: str) -> tuple[int, str]:
        async with self.session.get(self.url + path, timeout=TIMEOUT) as response:
            return response.status, await response.text()

    async def call(self, binding: str, name: str, method: str, *args: Any, **kw: Any) -> Any:
        """The method's result, or ("error", text) when it raised."""
        url = f"{self.url}/rpc/{binding}/{name}/{method}"
        body = {"args": list(args), "kwargs": kw}
        async with self.session.post(url, json=body, timeout=TIMEOUT) as response:
            if response.status == 599:
                return ("error", await response.text())
            assert response.status == 200, await response.text()
            return await response.json()

    async def running(self, name: str) -> list[ContainerInfo]:
        infos = await self.runtime.list({"dockyard.app": self.app, "dockyard.object_name": name})
        return [i for i in infos if i.running]

    async def one_running(self, name: str) -> ContainerInfo:
        [info] = await wait_until(lambda: self.running(name))
        return info

    async def none_running(self, name: str) -> bool:
        return not await self.running(name)

    async def stops(self, binding: str, name: str) -> list[Any]:
        return await wait_until(lambda: self.call(binding, name, "recorded", "stops"), within=15)


@pytest_asyncio.fixture
async def cf(docker_runtime: DockerRuntime, shared: Shared) -> AsyncIterator[Lab]:
    before = len(shared.dev.lines)
    async with aiohttp.ClientSession() as session:
        yield Lab(session, docker_runtime, shared.name, shared.dev.url)
    print("\n".join(shared.dev.lines[before:]))


# 1. stop


async def test_stop_sends_the_signal_and_returns_and_destroy_kills(cf: Lab) -> None:
    assert (await cf.get("/c/STUBBORN/s1/"))[0] == 200
    info = await cf.one_running("s1")
    assert await cf.call("STUBBORN", "s1", "stop") is None
    # SIGTERM sent and ignored: stop() did not wait, and nothing escalated to SIGKILL.
    assert [i.id for i in await cf.running("s1")] == [info.id]
    assert (await cf.call("STUBBORN", "s1", "get_state"))["status"] == "stopping"
    assert await cf.call("STUBBORN", "s1", "destroy") is None
    assert await cf.none_running("s1")
    assert await cf.stops("STUBBORN", "s1") == [[137, "runtime_signal", "destroy"]]


@pytest.mark.slow
async def test_sleep_sends_sigterm_then_sigkill_after_the_class_grace(cf: Lab) -> None:
    assert (await cf.get("/c/STUBBORNSLEEPER/s2/"))[0] == 200
    await cf.one_running("s2")
    await wait_until(lambda: cf.none_running("s2"), within=10)
    assert await cf.stops("STUBBORNSLEEPER", "s2") == [[137, "runtime_signal", "sleep"]]


# 2. on_stop reasons


@pytest.mark.slow
async def test_on_stop_reason_is_cloudflares_with_dockyards_detail(cf: Lab) -> None:
    assert (await cf.get("/c/SLEEPER/r1/"))[0] == 200
    assert (await cf.get("/c/QUITTER/r2/"))[0] == 200
    assert (await cf.get("/c/BASE/r3/"))[0] == 200
    info = await cf.one_running("r2")
    await cf.runtime.exec(info.id, ["touch", "/tmp/quit"])
    assert await cf.call("BASE", "r3", "stop", "SIGINT") is None
    assert await cf.stops("QUITTER", "r2") == [[3, "exit", "exit"]]
    assert await cf.stops("BASE", "r3") == [[130, "runtime_signal", "stop"]]
    assert await cf.stops("SLEEPER", "r1") == [[143, "runtime_signal", "sleep"]]


async def test_hooks_under_cloudflares_names_are_called(cf: Lab) -> None:
    assert (await cf.get("/c/PORTED/h/"))[0] == 200
    assert await cf.call("PORTED", "h", "recorded", "starts") == ["healthy"]
    assert await cf.call("PORTED", "h", "stop") is None
    assert await cf.stops("PORTED", "h") == [[143, "runtime_signal"]]


# 3. schedules


async def test_schedules_have_cloudflares_shape_and_queries(cf: Lab) -> None:
    row = await cf.call("BASE", "sc", "add", 60, "one_arg", {"n": 1})
    assert row["id"] == row["taskId"] and row["callback"] == "one_arg"
    assert (row["type"], row["delayInSeconds"], row["payload"]) == ("delayed", 60, {"n": 1})
    assert abs(row["time"] - (time.time() + 60)) < 10
    other = await cf.call("BASE", "sc", "add", 60, "two_args", "x")
    assert await cf.call("BASE", "sc", "schedule_ids", "one_arg") == [row["taskId"]]
    assert sorted(await cf.call("BASE", "sc", "schedule_ids")) == sorted(
        [row["taskId"], other["taskId"]]
    )
    assert await cf.call("BASE", "sc", "schedule_of", other["taskId"]) == [
        other["taskId"],
        "two_args",
        "x",
    ]
    assert await cf.call("BASE", "sc", "delete_schedules", "two_args") == 1
    assert await cf.call("BASE", "sc", "schedule_ids") == [row["taskId"]]
    assert await cf.call("BASE", "sc", "deleteSchedule", row["taskId"]) is True

    # Both callback shapes run: (payload) and (payload, schedule).
    soon = await cf.call("BASE", "sc", "add", 0, "two_args", "b")
    await cf.call("BASE", "sc", "add", 0, "one_arg", "a")
    calls = await wait_until(lambda: _two(cf.call("BASE", "sc", "recorded", "calls")), within=10)
    assert sorted(calls) == [["one_arg", "a"], ["two_args", "b", soon["taskId"]]]


async def _two(calls: Any) -> Any:
    found = await calls
    return found if len(found) >= 2 else None


# 4. get_random, switch_port


async def test_get_random_is_awaitable_and_switch_port_copies(cf: Lab) -> None:
    status, text = await cf.get("/random/BASE")
    assert status == 200, text
    assert json.loads(text) == {"state": "stopped", "sync": "stopped"}
    status, text = await cf.get("/switch")
    assert status == 200, text
    seen = json.loads(text)
    assert seen["same"] is False
    assert "dockyard-container-target-port" not in seen["original"]
    assert seen["switched"]["dockyard-container-target-port"] == "8081"
    assert seen["switched"]["x-keep"] == "1"


# 5. start options


async def test_start_takes_cloudflares_start_and_wait_options(cf: Lab) -> None:
    options = {"envVars": {"PER_INSTANCE": "yes"}, "enableInternet": False}
    assert await cf.call("BASE", "so", "start", options, {"portToCheck": 8080}) is None
    assert (await cf.call("BASE", "so", "getState"))["status"] == "healthy"
    assert "PER_INSTANCE=yes" in await cf.call("BASE", "so", "env_of_container")


async def test_start_and_wait_for_ports_honours_cancellation_options(cf: Lab) -> None:
    began = time.monotonic()
    result = await cf.call(
        "LATEPORT",
        "sw",
        "start_and_wait_for_ports",
        ports=[8080, 8081],
        cancellation_options={"portReadyTimeoutMS": 700},
        start_options={"envVars": {"FROM_START": "1"}},
    )
    assert result[0] == "error" and "portReadyTimeoutMS" in result[1], result
    assert time.monotonic() - began < 10
    assert "FROM_START=1" in await cf.call("LATEPORT", "sw", "env_of_container")
    info = await cf.one_running("sw")
    await cf.runtime.exec(info.id, ["touch", "/tmp/open-8081"])
    assert await cf.call("LATEPORT", "sw", "wait_for_port", {"portToCheck": 8081}) is None
    assert await cf.call("LATEPORT", "sw", "startAndWaitForPorts", 8081) is None


# 6. environment and labels


async def test_cloudflare_environment_and_class_labels(cf: Lab) -> None:
    assert (await cf.get("/c/LABELED/el/"))[0] == 200
    info = await cf.one_running("el")
    env = await cf.call("LABELED", "el", "env_of_container")
    assert f"CLOUDFLARE_DURABLE_OBJECT_ID={info.labels['dockyard.object_id']}" in env
    assert f"CLOUDFLARE_APPLICATION_ID={cf.app}" in env
    for name in ("CLOUDFLARE_LOCATION", "CLOUDFLARE_REGION", "CLOUDFLARE_COUNTRY_A2"):
        assert any(line.startswith(name + "=") and len(line) > len(name) + 1 for line in env)
    assert f"DOCKYARD_APPLICATION={cf.app}" in env
    assert (info.labels["team"], info.labels["tier"]) == ("blue", "web")
    assert info.labels["dockyard.app"] == cf.app

    status, _ = await cf.get("/c/BADLABELS/bl/")
    assert status == 500
    [error] = await cf.call("BADLABELS", "bl", "recorded", "errors")
    assert "dockyard.app" in error and "reserved" in error
    assert await cf.none_running("bl")


# 7. state shape


async def test_get_state_has_cloudflares_shape(cf: Lab) -> None:
    before = time.time() * 1000
    assert (await cf.get("/c/BASE/st/"))[0] == 200
    fields = await cf.call("BASE", "st", "state_fields")
    assert set(fields["shape"]) == {"status", "lastChange", "exitCode"}
    assert fields["shape"]["status"] == "healthy"
    assert before - 1000 <= fields["shape"]["lastChange"] <= time.time() * 1000
    assert fields["last_change"] == fields["shape"]["lastChange"] / 1000
    assert fields["exit_code"] is None


# 8. ports


async def test_container_fetch_reaches_exposed_ports_and_names_them(cf: Lab) -> None:
    assert await cf.get("/cf/EXPOSED/p1/8081") == (200, "port 8081 answers\n")
    assert await cf.get("/cf/EXPOSED/p1/8080") == (200, "port 8080 answers\n")
    status, text = await cf.get("/cf/EXPOSED/p1/9999")
    assert status == 599
    assert "9999" in text and "8080, 8081" in text
