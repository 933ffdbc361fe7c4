"""The Container API as the README documents it, on the real engine, through `dockyard dev`.

Most tests share one `dockyard dev` (module scope) of a project with one class per
behaviour, each test on object names of its own; the image is built once for the module
and named as a local image, so no run builds anything. Tests that need a fresh process
(adoption, the config's dev port, the quick start) run their own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from dockyard.containers.docker import DockerRuntime
from dockyard.containers.runtime import ContainerInfo
from tests.support.api_project import (
    DevCommand,
    build_api_images,
    containers_cli,
    docker,
    make_api_project,
    remove_app,
    remove_test_images,
)
from tests.support.devserver import DevServer
from tests.support.engine import app_name, engine_inspect, wait_until
from tests.support.projects import Project

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass(frozen=True)
class Images:
    current: str
    other: str


@dataclass(frozen=True)
class Shared:
    project: Project
    dev: DevServer


@pytest.fixture(scope="module")
def images(busybox_image: str) -> Iterator[Images]:
    token = secrets.token_hex(4)
    current, other = build_api_images(token)
    try:
        yield Images(current, other)
    finally:
        remove_test_images(token)


@pytest.fixture(scope="module")
def shared(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    name = app_name("t-api")
    project = make_api_project(tmp_path_factory.mktemp("api"), images.current, name=name)
    try:
        with DevServer(project.root) as dev:
            yield Shared(project, dev)
    finally:
        remove_app(name)


@dataclass
class Lab:
    session: aiohttp.ClientSession
    runtime: DockerRuntime
    url: str = ""
    project: Project | None = None

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str]:
        async with self.session.get(self.url + path, timeout=TIMEOUT, **kwargs) as response:
            return response.status, await response.text()

    async def rpc(self, binding: str, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        body: Any = {"args": list(args), "kwargs": kwargs}
        url = f"{self.url}/rpc/{binding}/{name}/{method}"
        async with self.session.post(url, json=body, timeout=TIMEOUT) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def running(self, name: str, project: Project | None = None) -> list[ContainerInfo]:
        project = project or self.project
        assert project is not None
        infos = await self.runtime.list({**project.labels, "dockyard.object_name": name})
        return [i for i in infos if i.running]

    async def one_running(self, name: str) -> ContainerInfo:
        [info] = await wait_until(lambda: self.running(name))
        return info

    async def none_running(self, name: str) -> bool:
        return not await self.running(name)

    async def file_exists(self, info: ContainerInfo, path: str) -> bool:
        return (await self.runtime.exec(info.id, ["test", "-f", path])).exit_code == 0


@pytest_asyncio.fixture
async def lab(docker_runtime: DockerRuntime) -> AsyncIterator[Lab]:
    async with aiohttp.ClientSession() as session:
        yield Lab(session, docker_runtime)


@pytest_asyncio.fixture
async def api(lab: Lab, shared: Shared) -> AsyncIterator[Lab]:
    lab.url, lab.project = shared.dev.url, shared.project
    before = len(shared.dev.lines)
    yield lab
    # What dockyard dev printed during the test: pytest shows it when the test fails.
    print("\n".join(shared.dev.lines[before:]))


# Ports


async def test_switch_port_and_the_target_port_header_choose_the_port(api: Lab) -> None:
    assert await api.get("/c/TWOPORTS/s/") == (200, "port 8080 answers\n")
    assert await api.get("/sw/TWOPORTS/s/8081/") == (200, "port 8081 answers\n")
    # The header switch_port sets, and Cloudflare's name for it, set by the worker.
    for header in ("dockyard-container-target-port", "cf-container-target-port"):
        assert await api.get(f"/hdr/TWOPORTS/s/{header}/8081/") == (200, "port 8081 answers\n")
    # The header chooses the port and goes no further: the container never sees it.
    for path in (
        "/sw/TWOPORTS/s/8080/cgi-bin/env",
        "/hdr/TWOPORTS/s/dockyard-container-target-port/8080/cgi-bin/env",
        "/hdr/TWOPORTS/s/cf-container-target-port/8080/cgi-bin/env",
    ):
        status, env = await api.get(path)
        assert status == 200 and "REQUEST_URI=/cgi-bin/env" in env
        assert "TARGET_PORT" not in env
    status, text = await api.get("/hdr/TWOPORTS/s/dockyard-container-target-port/http/")
    assert status == 400 and "'http'" in text
    # Only the worker chooses the port: the same header from the client is dropped.
    for header in ("dockyard-container-target-port", "cf-container-target-port"):
        assert await api.get("/c/TWOPORTS/s/", headers={header: "8081"}) == (
            200,
            "port 8080 answers\n",
        )
    assert len(await api.running("s")) == 1


async def test_required_ports_are_published_and_awaited_by_start_and_wait_for_ports(
    api: Lab,
) -> None:
    waiting = asyncio.create_task(api.rpc("LATEPORT", "late", "start_and_wait_for_ports"))
    info = await api.one_running("late")
    assert sorted(info.host_ports) == [8080, 8081]

    async def port_8080_answers() -> bool:
        try:
            async with api.session.get(f"http://127.0.0.1:{info.host_ports[8080]}/") as r:
                return r.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await wait_until(port_8080_answers)
    # 8080 answers, 8081 does not listen yet: the start is not done, and the container is
    # not healthy, not even once Dockyard's own probes (those that end the start boost)
    # have seen 8080 answer: they back off to wait_interval at most, well within 1.5 s.
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        assert (await api.rpc("LATEPORT", "late", "get_state"))["status"] == "running"
        await asyncio.sleep(0.05)
    assert not waiting.done()
    await api.runtime.exec(info.id, ["touch", "/tmp/open-8081"])
    assert await asyncio.wait_for(waiting, 15) is None
    # Once it returned, 8081 answers at the first try.
    async with api.session.get(f"http://127.0.0.1:{info.host_ports[8081]}/") as response:
        assert await response.text() == "port 8081 answers\n"
    assert (await api.rpc("LATEPORT", "late", "get_state"))["status"] == "healthy"

    # Given a port, it waits for that port only.
    await asyncio.wait_for(api.rpc("LATEPORT", "late-8080", "start_and_wait_for_ports", 8080), 15)
    assert (await api.rpc("LATEPORT", "late-8080", "get_state"))["status"] == "healthy"


async def test_container_fetch_sends_method_headers_and_body_to_a_port(api: Lab) -> None:
    body = b"z" * 12345
    async with api.session.post(api.url + "/cf/TWOPORTS/cf/8080/cgi-bin/count", data=body) as r:
        assert (r.status, await r.text()) == (200, "POST container-fetch 12345\n")
    assert await api.get("/cf/TWOPORTS/cf/8081/") == (200, "port 8081 answers\n")


async def test_ping_endpoint_sets_the_probe_host_and_path(api: Lab) -> None:
    assert await api.get("/c/PROBED/p/") == (200, "port 8080 answers\n")
    result = await api.rpc("PROBED", "p", "exec", ["cat", "/tmp/probes"])
    assert result["exit_code"] == 0
    assert result["stdout"].splitlines()[0] == "probe.local /cgi-bin/probe"


# Environment and start() overrides


async def test_env_vars_and_start_overrides(api: Lab) -> None:
    await api.rpc("ENVBOX", "plain", "start")
    plain = await api.one_running("plain")
    env = (await api.rpc("ENVBOX", "plain", "exec", ["env"]))["stdout"].splitlines()
    assert "GREETING=from the class" in env and "SHARED=class" in env
    assert f"DOCKYARD_DURABLE_OBJECT_ID={plain.labels['dockyard.object_id']}" in env
    assert f"DOCKYARD_APPLICATION={api.project.name}" in env  # type: ignore[union-attr]

    await api.rpc(
        "ENVBOX",
        "custom",
        "start",
        env_vars={"SHARED": "from start()", "EXTRA": "1"},
        entrypoint=["sh", "-c", "echo custom > /tmp/entry; exec httpd -f -p 8080 -h /www"],
        enable_internet=False,
    )
    custom = await api.one_running("custom")
    env = (await api.rpc("ENVBOX", "custom", "exec", ["env"]))["stdout"].splitlines()
    assert "GREETING=from the class" in env  # the class's env_vars stay, merged
    assert "SHARED=from start()" in env and "EXTRA=1" in env
    entry = await api.rpc("ENVBOX", "custom", "exec", ["cat", "/tmp/entry"])
    assert entry["stdout"] == "custom\n"

    # enable_internet=False: a network that does not masquerade (no route out), while the
    # published port still serves.
    networks = {}
    for info in (plain, custom):
        mode = (await engine_inspect(info.id))["HostConfig"]["NetworkMode"]
        mode = "bridge" if mode == "default" else mode
        options = json.loads(docker("network", "inspect", mode, "--format", "{{json .Options}}"))
        networks[info.labels["dockyard.object_name"]] = (mode, options or {})
    masquerade = "com.docker.network.bridge.enable_ip_masquerade"
    assert networks["custom"][0] != networks["plain"][0]
    assert networks["custom"][1].get(masquerade) == "false"
    assert networks["plain"][1].get(masquerade, "true") == "true"
    assert await api.get("/c/ENVBOX/custom/") == (200, "port 8080 answers\n")


# Budgets


async def test_stop_only_signals_and_destroy_kills(api: Lab) -> None:
    assert (await api.get("/c/STUBBORN/k/"))[0] == 200
    info = await api.one_running("k")
    await api.rpc("STUBBORN", "k", "stop")
    # As Cloudflare's: stop() sends SIGTERM and returns; this container ignores it, and
    # nothing escalates (stop_timeout is the grace of platform stops: sleep, shutdown).
    assert [i.id for i in await api.running("k")] == [info.id]
    await api.rpc("STUBBORN", "k", "destroy")
    assert await api.none_running("k")
    stops = await wait_until(lambda: api.rpc("STUBBORN", "k", "recorded", "stops"))
    assert stops == [[137, "runtime_signal"]]
    state = await api.rpc("STUBBORN", "k", "get_state")
    assert (state["status"], state["exitCode"]) == ("stopped", 137)


async def test_start_timeout_fails_the_start_and_leaves_nothing_running(api: Lab) -> None:
    status, text = await api.get("/c/SLOWENGINE/t/")
    assert status == 500 and text.startswith("Failed to start container:")
    assert await api.none_running("t")
    [[hook, message]] = await api.rpc("SLOWENGINE", "t", "recorded", "hooks")
    assert hook == "on_error" and "within 0.001s" in message


# Hooks


async def test_on_start_runs_once_per_start_once_the_port_answers(api: Lab) -> None:
    for _ in range(3):
        assert (await api.get("/c/BASE/hooks/"))[0] == 200
    assert await api.rpc("BASE", "hooks", "recorded", "hooks") == [["on_start", "healthy"]]
    await api.rpc("BASE", "hooks", "stop")
    assert (await api.get("/c/BASE/hooks/"))[0] == 200
    assert await api.rpc("BASE", "hooks", "recorded", "hooks") == [["on_start", "healthy"]] * 2


async def test_on_error_sees_the_failed_start(api: Lab) -> None:
    status, text = await api.get("/c/BADENTRY/e/")
    assert status == 500 and text.startswith("Failed to start container:")
    [[hook, message]] = await api.rpc("BADENTRY", "e", "recorded", "hooks")
    assert hook == "on_error" and "/no/such/program" in message
    assert await api.none_running("e")


@pytest.mark.slow
async def test_an_overridden_on_activity_expired_decides_what_sleep_does(api: Lab) -> None:
    assert (await api.get("/c/KEEPER/keep/"))[0] == 200
    await api.one_running("keep")
    # The override keeps it running the first time (so the second expiry finds it still
    # healthy) and stops it the second time.
    await wait_until(lambda: api.none_running("keep"), within=8)
    assert await api.rpc("KEEPER", "keep", "recorded", "expired") == ["healthy", "healthy"]
    stops = await wait_until(lambda: api.rpc("KEEPER", "keep", "recorded", "stops"))
    assert stops == [[143, "runtime_signal"]]


@pytest.mark.slow
async def test_renew_activity_timeout_keeps_an_idle_container_awake(api: Lab) -> None:
    assert (await api.get("/c/RENEWED/r/"))[0] == 200
    info = await api.one_running("r")
    # Twice sleep_after (2 s) with no request, only renewals: it stays up.
    until = time.monotonic() + 4.0
    while time.monotonic() < until:
        assert await api.rpc("RENEWED", "r", "renew_activity_timeout") is None
        assert [i.id for i in await api.running("r")] == [info.id]
        await asyncio.sleep(0.25)
    renewed = time.monotonic()
    await wait_until(lambda: api.none_running("r"), within=6, interval=0.05)
    assert time.monotonic() - renewed >= 1.5
    stops = await wait_until(lambda: api.rpc("RENEWED", "r", "recorded", "stops"))
    assert stops == [[143, "runtime_signal"]]


# Exec


async def test_exec_stream_streams_output_as_it_comes(api: Lab) -> None:
    await api.rpc("BASE", "exec", "start")
    info = await api.one_running("exec")
    command = [
        "sh",
        "-c",
        "echo before; while [ ! -f /tmp/go ]; do sleep 0.05; done; echo after; echo oops >&2; "
        "exit 3",
    ]
    async with api.session.post(api.url + "/c/BASE/exec/exec-stream", json=command) as response:
        assert response.status == 200
        seen = b""
        while b"before" not in seen:
            seen += await asyncio.wait_for(response.content.readany(), 10)
        # The first line arrived while the command still waits for /tmp/go.
        assert b"after" not in seen
        await api.runtime.exec(info.id, ["touch", "/tmp/go"])
        seen += await asyncio.wait_for(response.content.read(), 10)
    text = seen.decode()
    assert "stdout: before\n" in text and "stdout: after\n" in text
    assert "stderr: oops\n" in text and text.endswith("exit 3\n")


# Schedules


async def test_get_schedule_and_delete_schedule(api: Lab) -> None:
    later = await api.rpc("BASE", "sched", "add_schedule", 60, {"n": "later"})
    row = await api.rpc("BASE", "sched", "get_schedule", later)
    assert (row["id"], row["callback"], row["payload"]) == (later, "record", {"n": "later"})
    assert (row["type"], row["delay_seconds"]) == ("delayed", 60.0)
    assert abs(row["time"] - (time.time() + 60)) < 10
    assert await api.rpc("BASE", "sched", "delete_schedule", later) is True
    assert await api.rpc("BASE", "sched", "get_schedule", later) is None
    assert await api.rpc("BASE", "sched", "delete_schedule", later) is False

    # A deleted schedule never runs: one due before a kept one is deleted, the kept one runs.
    dropped = await api.rpc("BASE", "sched", "add_schedule", 0.5, "dropped")
    await api.rpc("BASE", "sched", "add_schedule", 1.0, "kept")
    assert await api.rpc("BASE", "sched", "delete_schedule", dropped) is True
    ran = await wait_until(lambda: api.rpc("BASE", "sched", "recorded", "scheduled"), within=10)
    assert ran == ["kept"]
    assert await api.rpc("BASE", "sched", "list_schedules") == []


# Failures


async def test_a_container_that_vanishes_mid_request_gives_502(api: Lab) -> None:
    request = asyncio.create_task(api.get("/c/BASE/gone/cgi-bin/hang"))
    info = await api.one_running("gone")
    await wait_until(lambda: api.file_exists(info, "/tmp/hanging"))
    await api.runtime.kill(info.id)
    status, _ = await asyncio.wait_for(request, 15)
    assert status == 502

    async def noticed() -> bool:
        state = await api.rpc("BASE", "gone", "get_state")
        return state["status"] in ("stopped", "stopped_with_code")

    await wait_until(noticed, within=10)
    # The next request starts a fresh container.
    assert await api.get("/c/BASE/gone/") == (200, "port 8080 answers\n")
    [fresh] = await api.running("gone")
    assert fresh.id != info.id


async def test_a_container_that_vanishes_mid_body_breaks_the_response(api: Lab) -> None:
    # 2 MB, streamed: the status is out before the kill, so only a broken body can say it.
    async with api.session.get(api.url + "/c/BASE/cut/cgi-bin/partial", timeout=TIMEOUT) as r:
        assert r.status == 200
        assert await r.content.readexactly(1_000_000) == b"a" * 1_000_000
        info = await api.one_running("cut")
        await api.runtime.kill(info.id)
        # The client must see a broken response, never a short one that looks complete.
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.content.read()


# The CLI


async def test_containers_logs_prints_the_container_output(api: Lab) -> None:
    assert (await api.get("/c/LOGGER/talk/"))[0] == 200
    await api.one_running("talk")
    root = api.project.root  # type: ignore[union-attr]
    logs = await asyncio.to_thread(containers_cli, root, "logs", "talk")
    assert logs.returncode == 0, logs.stderr
    # Both streams; the engine keeps no order between stdout and stderr lines.
    lines = logs.stdout.splitlines()
    assert sorted(lines) == ["first line, on stdout", "second line, on stderr"]
    last = await asyncio.to_thread(containers_cli, root, "logs", "talk", "--tail", "1")
    assert (last.returncode, last.stdout) == (0, lines[-1] + "\n")


# Runs of their own


@pytest.mark.slow
async def test_adoption_removes_containers_of_an_older_version(
    lab: Lab, images: Images, tmp_path: Path
) -> None:
    name = app_name("t-api")
    project = make_api_project(tmp_path / "app", images.current, ("Base",), name=name)
    try:
        dev = DevServer(project.root).start()
        lab.url = dev.url
        assert (await lab.get("/c/BASE/old/"))[0] == 200
        [old] = await lab.running("old", project)
        dev.kill()
        assert [i.id for i in await lab.running("old", project)] == [old.id]

        make_api_project(project.root, images.other, ("Base",), name=name)
        with DevServer(project.root) as dev:
            # Gone before the new run serves anything.
            assert await lab.runtime.inspect(old.id) is None
            lab.url = dev.url
            assert await lab.get("/c/BASE/old/") == (200, "port 8080 answers\n")
            [new] = await lab.running("old", project)
            assert new.id != old.id
            assert new.labels["dockyard.version"] != old.labels["dockyard.version"]
        assert await lab.runtime.list(project.labels) == []
    finally:
        remove_app(name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_dev_ip_and_port_from_the_config(lab: Lab, images: Images, tmp_path: Path) -> None:
    name = app_name("t-api")
    port = free_port()
    project = make_api_project(
        tmp_path / "app",
        images.current,
        ("Base",),
        name=name,
        dev={"ip": "127.0.0.1", "port": port},
    )
    argv = [sys.executable, "-m", "dockyard", "dev", str(project.root)]
    try:
        with DevCommand(argv, project.root) as dev:
            assert dev.url == f"http://127.0.0.1:{port}"
            lab.url = dev.url
            assert await lab.get("/c/BASE/x/") == (200, "port 8080 answers\n")
    finally:
        remove_app(name)


async def curl(url: str) -> str:
    """The body of a GET, with curl as the README says when it is there."""
    if shutil.which("curl") is None:
        async with aiohttp.ClientSession() as session, session.get(url, timeout=TIMEOUT) as r:
            assert r.status == 200
            return await r.text()
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", "--max-time", "30", url, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"curl exited with {proc.returncode}"
    return out.decode()


@pytest.mark.slow
async def test_readme_quick_start(lab: Lab, tmp_path: Path, busybox_image: str) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8787))
        except OSError:
            pytest.skip("port 8787 is in use: the quick start serves there")
    # examples/hello as the README runs it, copied so its .dockyard state stays out of the
    # repository, under an app name of its own so it never touches another run's containers.
    project = tmp_path / "hello"
    shutil.copytree(ROOT / "examples" / "hello", project, ignore=shutil.ignore_patterns(".*"))
    config = project / "wrangler.jsonc"
    name = app_name("t-hello")
    config.write_text(config.read_text().replace('"hello"', json.dumps(name)))
    dockyard = str(Path(sys.executable).parent / "dockyard")
    try:
        dev = DevCommand([dockyard, "dev", str(project)], project).start()
        try:
            assert dev.url == "http://127.0.0.1:8787"
            assert await curl("http://127.0.0.1:8787/") == "Hello World\n"
        finally:
            code = dev.stop(signal.SIGINT)
        assert code == 0, dev.output
        assert await lab.runtime.list({"dockyard.app": name}) == []
    finally:
        remove_app(name)
