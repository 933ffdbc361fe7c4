"""The Container class on the real engine, driven through `dockyard dev` like a user would."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from dockyard.containers.docker import DockerRuntime
from dockyard.containers.runtime import ContainerInfo
from tests.support.devserver import DevServer
from tests.support.engine import engine_inspect, wait_until
from tests.support.projects import Project, make_project

pytestmark = pytest.mark.docker


@dataclass
class Lab:
    """What each test here works with; every project made through it is cleaned up."""

    root: Path
    runtime: DockerRuntime
    session: aiohttp.ClientSession
    projects: list[Project] = field(default_factory=list)

    def project(self, classes: dict[str, dict[str, Any]], **kwargs: Any) -> Project:
        project = make_project(self.root / "app", classes, **kwargs)
        self.projects.append(project)
        return project

    async def running(self, project: Project, **labels: str) -> list[ContainerInfo]:
        infos = await self.runtime.list({**project.labels, **labels})
        return [i for i in infos if i.running]

    async def none_running(self, project: Project, name: str) -> bool:
        return not await self.running(project, **{"dockyard.object_name": name})

    async def rpc(self, url: str, *args: Any) -> Any:
        async with self.session.post(url, json=list(args)) as response:
            assert response.status == 200, await response.text()
            return await response.json()


@pytest_asyncio.fixture
async def lab(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> AsyncIterator[Lab]:
    async with aiohttp.ClientSession() as session:
        lab = Lab(tmp_path, docker_runtime, session)
        try:
            yield lab
        finally:
            for project in lab.projects:
                for info in await docker_runtime.list(project.labels):
                    await docker_runtime.remove(info.id)


async def test_cold_start_shares_one_start_across_50_requests(lab: Lab) -> None:
    project = lab.project({"Web": {}})
    with DevServer(project.root) as dev:

        async def first(_: int) -> tuple[int, str]:
            async with lab.session.get(dev.url + "/c/WEB/solo/") as response:
                return response.status, await response.text()

        results = await asyncio.gather(*(first(i) for i in range(50)))
        assert results == [(200, "hello from the container\n")] * 50
        assert len(await lab.running(project)) == 1
        env = await (await lab.session.get(dev.url + "/c/WEB/solo/cgi-bin/env")).text()
        assert "DOCKYARD_APPLICATION=" + project.name in env
        assert "DOCKYARD_LOCATION=local" in env
        [info] = await lab.running(project)
        assert f"DOCKYARD_DURABLE_OBJECT_ID={info.labels['dockyard.object_id']}" in env
        assert info.labels["dockyard.class"] == "Web"
        assert info.labels["dockyard.version"]
        assert info.labels["dockyard.object_name"] == "solo"
    # dockyard dev stops what it started, and the object saw that run end as a shutdown.
    assert await lab.running(project) == []
    with DevServer(project.root) as dev:
        assert await lab.rpc(dev.url + "/rpc/WEB/solo/stops") == [[143, "shutdown"]]
        assert (await lab.rpc(dev.url + "/rpc/WEB/solo/state"))["status"] == "stopped"


async def test_names_isolate_and_get_random_stays_within_its_set(lab: Lab) -> None:
    project = lab.project({"Web": {}})
    with DevServer(project.root) as dev:
        for name in ("alice", "bob", "alice"):
            async with lab.session.get(f"{dev.url}/c/WEB/{name}/") as response:
                assert response.status == 200
        names = sorted(i.labels["dockyard.object_name"] for i in await lab.running(project))
        assert names == ["alice", "bob"]
        statuses = []
        for _ in range(100):
            async with lab.session.get(f"{dev.url}/random/WEB/3/") as response:
                statuses.append(response.status)
        assert statuses == [200] * 100
        randoms = [
            i
            for i in await lab.running(project)
            if i.labels["dockyard.object_name"].startswith("instance-")
        ]
        assert 1 <= len(randoms) <= 3


async def test_sleep_after_stops_idle_containers_but_not_busy_ones(
    lab: Lab, python_image: str
) -> None:
    project = lab.project(
        {"Web": {}, "Echo": {}},
        sleep_after="2s",
        base_images={"echo": python_image},
    )
    with DevServer(project.root) as dev:
        # Idle: stopped 2-4 s after the last request, on_stop called once.
        async with lab.session.get(dev.url + "/c/WEB/idle/") as response:
            assert response.status == 200
        last = time.monotonic()
        await wait_until(lambda: lab.none_running(project, "idle"), within=6, interval=0.05)
        stopped_after = time.monotonic() - last
        assert 2.0 <= stopped_after <= 4.0, stopped_after
        stops = await wait_until(lambda: lab.rpc(dev.url + "/rpc/WEB/idle/stops"))
        assert len(stops) == 1 and stops[0][1] == "sleep"
        state = await lab.rpc(dev.url + "/rpc/WEB/idle/state")
        assert state["status"] == "stopped"

        # A slow request (5 s) keeps it awake past sleep_after.
        async with lab.session.get(dev.url + "/c/WEB/slow/cgi-bin/slow?5") as response:
            assert await response.text() == "slow done\n"
        assert len(await lab.running(project, **{"dockyard.object_name": "slow"})) == 1

        # So does an open WebSocket with no traffic for longer than sleep_after.
        async with lab.session.ws_connect(dev.url + "/c/ECHO/ws/") as ws:
            await ws.send_str("ping")
            assert (await ws.receive(timeout=30)).data == "ping"
            await asyncio.sleep(3.5)  # idle WebSocket, longer than sleep_after on purpose
            assert len(await lab.running(project, **{"dockyard.object_name": "ws"})) == 1
            await ws.send_str("still here")
            assert (await ws.receive(timeout=10)).data == "still here"
        await wait_until(lambda: lab.none_running(project, "ws"), within=6, interval=0.05)

        # The next request starts a fresh container.
        async with lab.session.get(dev.url + "/c/WEB/idle/") as response:
            assert response.status == 200
        assert len(await lab.running(project, **{"dockyard.object_name": "idle"})) == 1


async def test_exit_code_is_reported_and_next_request_starts_fresh(lab: Lab) -> None:
    project = lab.project({"Quitter": {}})
    with DevServer(project.root) as dev:
        async with lab.session.get(dev.url + "/c/QUITTER/q/") as response:
            assert response.status == 200
        [first] = await lab.running(project)
        await lab.rpc(dev.url + "/rpc/QUITTER/q/run", ["touch", "/tmp/quit"])

        async def stopped() -> Any:
            state = await lab.rpc(dev.url + "/rpc/QUITTER/q/state")
            return state if state["status"] == "stopped_with_code" else None

        state = await wait_until(stopped, within=10)
        assert state["exit_code"] == 3
        assert await lab.rpc(dev.url + "/rpc/QUITTER/q/stops") == [[3, "exit"]]
        # The console shows the start (with its time) and the exit, by class and object.
        dev.wait_for(r"\[Quitter/q\] container\.start: container started in \d+ ms")
        dev.wait_for(r"\[Quitter/q\] container\.stop: container stopped \(exit\), exit code 3")
        async with lab.session.get(dev.url + "/c/QUITTER/q/") as response:
            assert response.status == 200
        [second] = await lab.running(project)
        assert second.id != first.id


async def test_lifecycle_methods_exec_and_schedules_through_the_stub(lab: Lab) -> None:
    project = lab.project({"Web": {}})
    base = "/rpc/WEB/ops/"
    dev = DevServer(project.root).start()
    try:
        await lab.rpc(dev.url + base + "start")
        assert len(await lab.running(project)) == 1
        result = await lab.rpc(
            dev.url + base + "run", ["sh", "-c", "echo out; echo err >&2; exit 4"]
        )
        assert result == {"exit_code": 4, "stdout": "out\n", "stderr": "err\n"}
        await lab.rpc(dev.url + base + "stop")

        async def stopped() -> bool:
            # stop() sends SIGTERM and returns, as Cloudflare's; the end follows.
            return (await lab.rpc(dev.url + base + "state"))["status"] == "stopped"

        await wait_until(stopped)
        assert await lab.running(project) == []
        await lab.rpc(dev.url + base + "start")
        await lab.rpc(dev.url + base + "destroy")
        assert await lab.running(project) == []
        assert [s[1] for s in await lab.rpc(dev.url + base + "stops")] == ["stop", "destroy"]

        # A schedule 3 s ahead survives a restart of dockyard dev and runs once.
        schedule_id = await lab.rpc(dev.url + base + "add_schedule", 3, {"n": 1})
        assert await lab.rpc(dev.url + base + "schedules") == [schedule_id]
        assert dev.stop() == 0
        dev = DevServer(project.root).start()

        async def ran() -> Any:
            return await lab.rpc(dev.url + base + "scheduled")

        assert await wait_until(ran, within=15, interval=0.2) == [{"n": 1}]
        assert await lab.rpc(dev.url + base + "schedules") == []
        await asyncio.sleep(1)
        assert await lab.rpc(dev.url + base + "scheduled") == [{"n": 1}]
    finally:
        dev.stop()


async def test_lite_instance_limits_and_oom_kill(lab: Lab) -> None:
    project = lab.project({"Web": {"instance_type": "lite"}, "Hog": {}})
    with DevServer(project.root) as dev:
        async with lab.session.get(dev.url + "/c/WEB/lim/") as response:
            assert response.status == 200
        [info] = await lab.running(project)
        host_config = (await engine_inspect(info.id))["HostConfig"]
        assert host_config["Memory"] == 256 * 1024 * 1024
        assert host_config["MemorySwap"] == host_config["Memory"]
        assert host_config["NanoCpus"] == 1_000_000_000 // 16

        await lab.rpc(dev.url + "/rpc/HOG/hog/start")

        async def stopped() -> Any:
            stops = await lab.rpc(dev.url + "/rpc/HOG/hog/stops")
            return stops or None

        stops = await wait_until(stopped, within=20, interval=0.1)
        assert stops == [[137, "oom"]]
        dev.wait_for("running out of memory")


async def test_websocket_echo_and_50_mb_streams(lab: Lab, python_image: str) -> None:
    project = lab.project(
        {"Web": {}, "Echo": {}},
        base_images={"echo": python_image},
    )
    with DevServer(project.root) as dev:
        async with lab.session.ws_connect(dev.url + "/c/ECHO/e/") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=30)).data == "hello"
            await ws.send_bytes(b"\x00\x01" * 40000)
            assert (await ws.receive(timeout=10)).data == b"\x00\x01" * 40000

        size = 50 * 1024 * 1024

        async def body() -> AsyncIterator[bytes]:
            chunk = b"y" * (1 << 20)
            for _ in range(50):
                yield chunk

        baseline = dev.rss_kib()
        headers = {"Content-Length": str(size)}
        async with lab.session.post(
            dev.url + "/c/WEB/big/cgi-bin/count", data=body(), headers=headers
        ) as response:
            assert response.status == 200
            assert (await response.text()).strip() == str(size)
        received = 0
        async with lab.session.get(dev.url + "/c/WEB/big/big") as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(1 << 20):
                received += len(chunk)
        assert received == size
        growth_mib = (dev.peak_rss_kib() - baseline) / 1024
        assert growth_mib < 20, f"dockyard dev grew {growth_mib:.1f} MiB while streaming"


async def test_start_failures_map_to_clear_errors(lab: Lab) -> None:
    project = lab.project(
        {"Web": {"max_instances": 2}, "BadEntry": {}, "NoPort": {}, "Broken": {}},
    )
    with DevServer(project.root, "--debug-errors") as dev:
        dev.wait_for("exit")  # the failing build's log reaches the console
        for name in ("a", "b"):
            async with lab.session.get(f"{dev.url}/c/WEB/{name}/") as response:
                assert response.status == 200
        async with lab.session.get(f"{dev.url}/c/WEB/c/") as response:
            assert response.status == 503
            assert "max_instances (2)" in await response.text()

        async with lab.session.get(f"{dev.url}/c/BADENTRY/x/") as response:
            text = await response.text()
            assert response.status == 500
            assert text.startswith("Failed to start container:") and "/no/such/program" in text

        async with lab.session.get(f"{dev.url}/c/NOPORT/x/") as response:
            text = await response.text()
            assert response.status == 500
            assert "port 8080 did not answer" in text
        # A start that failed leaves nothing running.
        assert await lab.running(project, **{"dockyard.class": "NoPort"}) == []

        async with lab.session.get(f"{dev.url}/c/BROKEN/x/") as response:
            text = await response.text()
            assert response.status == 500
            assert "Failed to start container:" in text and "exit 7" in text

        # Each failure is a platform event on the console, and counted by kind.
        dev.wait_for(r"\[Web/c\] container\.start_failed: container did not start: max_inst")
        dev.wait_for(r"\[Broken/x\] container\.start_failed: ")
        metrics = dev.wait_for(r"metrics on (http://\S+/metrics)").group(1)
        async with lab.session.get(metrics) as response:
            text = await response.text()
        failures = {
            (s.labels["class_name"], s.labels["reason"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name == "dockyard_container_start_failures"
            for s in family.samples
            if s.name.endswith("_total")
        }
        assert failures[("Web", "capacity")] == 1
        assert failures[("Broken", "image")] == 1
        assert failures[("NoPort", "start")] == 1


async def test_clients_see_no_error_details_but_an_id_the_log_explains(lab: Lab) -> None:
    project = lab.project({"BadEntry": {}, "Broken": {}})
    with DevServer(project.root) as dev:
        for path, detail in (("/c/BADENTRY/x/", "/no/such/program"), ("/c/BROKEN/x/", "exit 7")):
            async with lab.session.get(dev.url + path) as response:
                text = await response.text()
                assert response.status == 500
                match = re.fullmatch(r"Failed to start container: (.+) \(error id (\w+)\)\n", text)
                assert match, text
                assert detail not in text
                # The same id leads to the details in the console (wrapped over lines).
                dev.wait_for(rf"error {match.group(2)}: ")
                logged = dev.output[dev.output.index(f"error {match.group(2)}: ") :]
                assert detail in logged[:3000]


async def test_sigkill_of_dev_then_restart_adopts_without_orphans_or_duplicates(lab: Lab) -> None:
    project = lab.project({"Web": {}})
    dev = DevServer(project.root).start()
    for name in ("one", "two"):
        async with lab.session.get(f"{dev.url}/c/WEB/{name}/") as response:
            assert response.status == 200
    before = {i.labels["dockyard.object_name"]: i.id for i in await lab.running(project)}
    dev.kill()
    # Containers outlive a killed platform ...
    assert len(await lab.running(project)) == 2
    dev = DevServer(project.root).start()
    try:
        # ... and the next run takes them back instead of starting new ones.
        for name in ("one", "two", "three"):
            async with lab.session.get(f"{dev.url}/c/WEB/{name}/") as response:
                assert response.status == 200
        after = {i.labels["dockyard.object_name"]: i.id for i in await lab.running(project)}
        assert after["one"] == before["one"] and after["two"] == before["two"]
        assert sorted(after) == ["one", "three", "two"]
        assert (await lab.rpc(dev.url + "/rpc/WEB/one/state"))["status"] == "healthy"
    finally:
        assert dev.stop() == 0
    assert await lab.running(project) == []
    assert json.dumps(await lab.runtime.list(project.labels), default=str) == "[]"


async def test_pause_sleep_mode_freezes_and_wakes_the_same_container(lab: Lab) -> None:
    project = lab.project({"Pauser": {}}, sleep_after="1s")
    with DevServer(project.root) as dev:
        async with lab.session.get(dev.url + "/c/PAUSER/p/") as response:
            assert response.status == 200
        [info] = await lab.running(project)

        async def paused() -> bool:
            return (await engine_inspect(info.id))["State"]["Status"] == "paused"

        await wait_until(paused, within=5, interval=0.05)
        assert (await lab.rpc(dev.url + "/rpc/PAUSER/p/state"))["status"] == "paused"
        async with lab.session.get(dev.url + "/c/PAUSER/p/") as response:
            assert response.status == 200
            assert await response.text() == "hello from the container\n"
        assert (await engine_inspect(info.id))["State"]["Status"] == "running"
        assert [i.id for i in await lab.running(project)] == [info.id]
        assert (await lab.rpc(dev.url + "/rpc/PAUSER/p/state"))["status"] == "healthy"
        # No run ended: pausing is not a stop.
        assert await lab.rpc(dev.url + "/rpc/PAUSER/p/stops") == []
        # It pauses again once idle, and a paused container still stops cleanly on exit.
        await wait_until(paused, within=5, interval=0.05)
    assert await lab.running(project) == []


def dockyard_cli(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    command, *rest = args
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dockyard",
            "containers",
            command,
            "--project",
            str(project.root),
            *rest,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


async def test_containers_cli_lists_and_operates_the_dev_app(lab: Lab) -> None:
    project = lab.project({"Web": {}})
    with DevServer(project.root) as dev:
        async with lab.session.get(dev.url + "/c/WEB/cli-object/") as response:
            assert response.status == 200
        [info] = await lab.running(project)

        listed = await asyncio.to_thread(dockyard_cli, project, "list")
        assert listed.returncode == 0, listed.stderr
        assert info.id[:12] in listed.stdout and "cli-object" in listed.stdout

        shown = await asyncio.to_thread(dockyard_cli, project, "info", "cli-object")
        assert shown.returncode == 0 and info.id in shown.stdout

        ran = await asyncio.to_thread(
            dockyard_cli, project, "exec", "cli-object", "--", "cat", "/www/index.html"
        )
        assert ran.returncode == 0 and ran.stdout == "hello from the container\n"

        failed = await asyncio.to_thread(
            dockyard_cli, project, "exec", "cli-object", "--", "sh", "-c", "exit 5"
        )
        assert failed.returncode == 5

        async with lab.session.get(dev.url + "/c/WEB/cli-object/no-such-page") as response:
            assert response.status == 404
        logs = await asyncio.to_thread(dockyard_cli, project, "logs", info.id[:12], "--tail", "20")
        assert logs.returncode == 0

        missing = await asyncio.to_thread(dockyard_cli, project, "info", "nobody")
        assert missing.returncode == 1 and "no container of app" in missing.stderr

        stopped = await asyncio.to_thread(dockyard_cli, project, "stop", "cli-object")
        assert stopped.returncode == 0
        # dockyard dev notices and records the end of the run.
        stops = await wait_until(lambda: lab.rpc(dev.url + "/rpc/WEB/cli-object/stops"))
        assert stops == [[143, "exit"]]


async def test_reloading_the_worker_keeps_the_running_container(lab: Lab) -> None:
    project = lab.project({"Web": {}})
    with DevServer(project.root) as dev:
        async with lab.session.get(dev.url + "/c/WEB/kept/") as response:
            assert response.status == 200
        [before] = await lab.running(project)
        worker = project.root / "worker.py"
        worker.write_text(worker.read_text() + "\n# an edit\n")
        dev.wait_for("Reloaded the worker")
        for _ in range(3):
            async with lab.session.get(dev.url + "/c/WEB/kept/") as response:
                assert response.status == 200
        assert [i.id for i in await lab.running(project)] == [before.id]
        assert (await lab.rpc(dev.url + "/rpc/WEB/kept/state"))["status"] == "healthy"
    assert await lab.running(project) == []


async def test_destroy_during_a_cold_start_leaves_nothing_running(lab: Lab) -> None:
    project = lab.project({"Web": {}})
    with DevServer(project.root) as dev:
        for attempt in range(3):
            name = f"racing-{attempt}"

            async def first_request(name: str = name) -> int:
                async with lab.session.get(f"{dev.url}/c/WEB/{name}/") as response:
                    return response.status

            request = asyncio.create_task(first_request())
            await asyncio.sleep(0.01)  # the start is under way, the engine not done yet
            await lab.rpc(f"{dev.url}/rpc/WEB/{name}/destroy")
            assert await request in (200, 500, 502)
            assert await lab.running(project, **{"dockyard.object_name": name}) == []
            assert (await lab.rpc(f"{dev.url}/rpc/WEB/{name}/state"))["status"] in (
                "stopped",
                "stopped_with_code",
            )
