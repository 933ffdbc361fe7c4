"""DockerRuntime and ensure_image on the real engine."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from pathlib import Path

import pytest

from dockyard.containers.docker import DockerRuntime
from dockyard.containers.images import base_images, context_files, ensure_image
from dockyard.containers.runtime import ContainerRuntime, ContainerSpec
from dockyard.errors import (
    ContainerError,
    ContainerGone,
    EngineUnavailable,
    ImageError,
    StartFailed,
)
from tests.support.engine import docker_cli, engine_inspect, http_get_when_ready, wait_until

pytestmark = pytest.mark.docker

HTTPD = [
    "sh",
    "-c",
    "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www",
]
# Prints "ready" once its TERM trap is installed, then idles; TERM makes it exit 42.
TRAPS_TERM = ["sh", "-c", 'trap "exit 42" TERM; echo ready; while :; do sleep 0.05; done']
IGNORES_TERM = ["sh", "-c", 'trap "" TERM; echo ready; while :; do sleep 0.05; done']


def spec(image: str, labels: dict[str, str], entrypoint: list[str], **kw: object) -> ContainerSpec:
    return ContainerSpec(image=image, labels=labels, entrypoint=entrypoint, **kw)  # type: ignore[arg-type]


async def wait_for_log(runtime: DockerRuntime, container_id: str, line: str) -> None:
    async def seen() -> bool:
        return line in [entry async for entry in runtime.logs(container_id)]

    await wait_until(seen)


def test_docker_runtime_satisfies_protocol() -> None:
    assert isinstance(DockerRuntime(), ContainerRuntime)


async def test_http_container_ports_labels_env_limits(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    started = time.perf_counter()
    info = await docker_runtime.run(
        spec(
            busybox_image,
            test_labels,
            HTTPD,
            env={"GREETING": "hi there"},
            ports=[8080],
            vcpu=1 / 16,
            memory_mib=256,
        )
    )
    body = await http_get_when_ready(f"http://127.0.0.1:{info.host_ports[8080]}/")
    print(f"run -> first HTTP answer: {(time.perf_counter() - started) * 1000:.0f} ms")
    assert body == "hello\n"

    assert info.running and info.status == "running" and info.exit_code is None
    assert info.labels["dockyard.app"] == test_labels["dockyard.app"]
    assert info.image == busybox_image
    assert info.started_at is not None and info.finished_at is None

    result = await docker_runtime.exec(info.id, ["env"])
    assert result.exit_code == 0
    assert "GREETING=hi there" in result.stdout.decode().splitlines()

    raw = await engine_inspect(info.id)
    host = raw["HostConfig"]
    assert host["NanoCpus"] == 62_500_000
    assert host["Memory"] == host["MemorySwap"] == 256 * 1024 * 1024
    assert host["PortBindings"]["8080/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": ""}]
    assert raw["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostIp"] == "127.0.0.1"


async def test_exit_code_via_wait(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    info = await docker_runtime.run(spec(busybox_image, test_labels, ["sh", "-c", "exit 3"]))
    status = await docker_runtime.wait(info.id)
    assert (status.exit_code, status.oom_killed) == (3, False)
    # Already exited: returns at once with the same answer.
    assert (await docker_runtime.wait(info.id)).exit_code == 3
    after = await docker_runtime.inspect(info.id)
    assert after is not None
    assert (after.status, after.running, after.exit_code) == ("exited", False, 3)
    assert after.finished_at is not None


async def test_oom_kill_is_reported(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    # dd fills a 256 MiB block buffer, four times the limit; with swap off the kernel
    # has to kill it.
    hog = ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"]
    info = await docker_runtime.run(spec(busybox_image, test_labels, hog, memory_mib=64))
    status = await docker_runtime.wait(info.id)
    assert status.oom_killed
    assert status.exit_code == 137
    after = await docker_runtime.inspect(info.id)
    assert after is not None and after.oom_killed


async def test_signal_stop_kill_remove(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    trapping = await docker_runtime.run(spec(busybox_image, test_labels, TRAPS_TERM))
    await wait_for_log(docker_runtime, trapping.id, "ready")
    await docker_runtime.signal(trapping.id, "SIGTERM")
    assert (await docker_runtime.wait(trapping.id)).exit_code == 42
    await docker_runtime.signal(trapping.id, 15)  # not running any more: a no-op

    # stop: SIGTERM first, so a process that handles it exits with its own code ...
    graceful = await docker_runtime.run(spec(busybox_image, test_labels, TRAPS_TERM))
    await wait_for_log(docker_runtime, graceful.id, "ready")
    started = time.perf_counter()
    await docker_runtime.stop(graceful.id, grace_period=5)
    assert time.perf_counter() - started < 4
    assert (await docker_runtime.wait(graceful.id)).exit_code == 42

    # ... and SIGKILL after the grace period for one that ignores it.
    stubborn = await docker_runtime.run(spec(busybox_image, test_labels, IGNORES_TERM))
    await wait_for_log(docker_runtime, stubborn.id, "ready")
    started = time.perf_counter()
    await docker_runtime.stop(stubborn.id, grace_period=1)
    elapsed = time.perf_counter() - started
    assert 0.9 < elapsed < 6
    assert (await docker_runtime.wait(stubborn.id)).exit_code == 137

    killed = await docker_runtime.run(spec(busybox_image, test_labels, IGNORES_TERM))
    await docker_runtime.kill(killed.id)
    assert (await docker_runtime.wait(killed.id)).exit_code == 137
    await docker_runtime.kill(killed.id)  # not running: a no-op

    await docker_runtime.remove(killed.id)
    assert await docker_runtime.inspect(killed.id) is None
    await docker_runtime.remove(killed.id)  # already gone: a no-op
    with pytest.raises(ContainerGone):
        await docker_runtime.wait(killed.id)
    with pytest.raises(ContainerGone):
        await docker_runtime.signal(killed.id, "SIGTERM")

    # remove also takes a running container down.
    running = await docker_runtime.run(spec(busybox_image, test_labels, IGNORES_TERM))
    await docker_runtime.remove(running.id)
    assert await docker_runtime.inspect(running.id) is None


async def test_exec_and_exec_stream(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    info = await docker_runtime.run(spec(busybox_image, test_labels, IGNORES_TERM))
    result = await docker_runtime.exec(
        info.id,
        ["sh", "-c", 'echo "$WHO in $(pwd) as $(id -u)"; echo oops >&2; exit 5'],
        env={"WHO": "me"},
        workdir="/tmp",
        user="1000",
    )
    assert result.exit_code == 5
    assert result.stdout == b"me in /tmp as 1000\n"
    assert result.stderr == b"oops\n"

    chunks: list[tuple[str, bytes]] = []
    script = "for i in 1 2 3; do echo $i; sleep 0.05; done; echo bad >&2; exit 2"
    async with docker_runtime.exec_stream(info.id, ["sh", "-c", script]) as proc:
        async for stream, chunk in proc:
            chunks.append((stream, chunk))
        assert await proc.exit_code() == 2
    stdout = b"".join(chunk for stream, chunk in chunks if stream == "stdout")
    assert stdout == b"1\n2\n3\n"
    assert ("stderr", b"bad\n") in chunks
    assert len([c for c in chunks if c[0] == "stdout"]) >= 2  # streamed, not buffered

    # exit_code() without reading the output first still works.
    async with docker_runtime.exec_stream(info.id, ["sh", "-c", "echo x; exit 9"]) as proc:
        assert await proc.exit_code() == 9

    await docker_runtime.kill(info.id)
    await docker_runtime.wait(info.id)
    with pytest.raises(ContainerError, match="not running"):
        await docker_runtime.exec(info.id, ["true"])


async def test_logs_tail_and_follow(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    script = "for i in 1 2 3 4 5; do echo line$i; sleep 0.05; done; echo to-stderr >&2"
    info = await docker_runtime.run(spec(busybox_image, test_labels, ["sh", "-c", script]))
    followed = [line async for line in docker_runtime.logs(info.id, follow=True)]
    assert followed == ["line1", "line2", "line3", "line4", "line5", "to-stderr"]
    await docker_runtime.wait(info.id)
    tail = [line async for line in docker_runtime.logs(info.id, tail=2)]
    assert tail == ["line5", "to-stderr"]

    # Following a running container, and stopping early, closes the stream cleanly.
    endless = ["sh", "-c", "i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.02; done"]
    ticking = await docker_runtime.run(spec(busybox_image, test_labels, endless))
    seen = []
    logs = docker_runtime.logs(ticking.id, follow=True, tail=0)
    async for line in logs:
        seen.append(line)
        if len(seen) == 3:
            break
    await logs.aclose()  # type: ignore[attr-defined]
    assert len(seen) == 3 and all(line.startswith("tick") for line in seen)


async def test_list_by_labels(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    first = await docker_runtime.run(
        spec(busybox_image, {**test_labels, "role": "a"}, IGNORES_TERM)
    )
    second = await docker_runtime.run(spec(busybox_image, test_labels, ["true"]))
    await docker_runtime.wait(second.id)

    everything = await docker_runtime.list(test_labels)
    assert {info.id for info in everything} == {first.id, second.id}
    assert {info.running for info in everything} == {True, False}
    only_a = await docker_runtime.list({**test_labels, "role": "a"})
    assert [info.id for info in only_a] == [first.id]
    assert await docker_runtime.list({**test_labels, "role": "b"}) == []


async def test_bad_entrypoint_is_start_failed_and_leaves_nothing(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    without_init = dataclasses.replace(spec(busybox_image, test_labels, ["nope"]), init=False)
    with pytest.raises(StartFailed) as caught:
        await docker_runtime.run(without_init)
    assert 'exec: "nope": executable file not found in $PATH' in str(caught.value)
    assert await docker_runtime.list(test_labels) == []


async def test_with_init_a_bad_entrypoint_exits_127_and_says_why(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    # The default init starts, then fails to exec the program: the engine's start succeeds.
    info = await docker_runtime.run(spec(busybox_image, test_labels, ["nope"]))
    assert (await docker_runtime.wait(info.id)).exit_code == 127
    output = " ".join([line async for line in docker_runtime.logs(info.id)])
    assert "nope" in output


async def test_init_forwards_sigterm_to_a_server_without_handlers(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    # httpd as PID 1 would ignore SIGTERM; under the init it ends at once.
    info = await docker_runtime.run(spec(busybox_image, test_labels, ["httpd", "-f", "-p", "8080"]))
    await docker_runtime.signal(info.id, "SIGTERM")
    status = await asyncio.wait_for(docker_runtime.wait(info.id), 5)
    assert status.exit_code == 143


async def test_missing_image_is_image_error(
    docker_runtime: DockerRuntime, test_labels: dict[str, str]
) -> None:
    ref = "dockyard/does-not-exist:never"
    with pytest.raises(ImageError) as caught:
        await docker_runtime.run(ContainerSpec(image=ref, labels=test_labels))
    assert ref in str(caught.value) and "never pulls" in str(caught.value)
    assert await docker_runtime.image_id(ref) is None


async def test_build_with_build_arg(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text(
        f"FROM {busybox_image}\nARG GREETING=unset\nCOPY hello.txt /hello.txt\n"
        'RUN echo "$GREETING" > /greeting\n'
    )
    (tmp_path / "hello.txt").write_text("from the context\n")
    output: list[str] = []
    tag = f"{test_labels['dockyard.app']}:build"
    started = time.perf_counter()
    image_id = await docker_runtime.build_image(
        tmp_path, Path("Dockerfile"), tag, {"GREETING": "bonjour"}, output.append, test_labels
    )
    print(f"build of a 4-step Dockerfile: {(time.perf_counter() - started) * 1000:.0f} ms")
    assert image_id.startswith("sha256:")
    assert (await docker_runtime.image_id(tag) or "").startswith("sha256:")
    assert any(re.match(r"Step 4/\d+ : RUN echo", line) for line in output)
    assert "" not in output

    cat = ["cat", "/greeting", "/hello.txt"]
    info = await docker_runtime.run(spec(tag, test_labels, cat))
    await docker_runtime.wait(info.id)
    assert [line async for line in docker_runtime.logs(info.id)] == [
        "bonjour",
        "from the context",
    ]


async def test_failing_build_names_the_step(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str], tmp_path: Path
) -> None:
    # Unique per run, so no step comes from a cache another build made.
    app = test_labels["dockyard.app"]
    (tmp_path / "Dockerfile").write_text(
        f"FROM {busybox_image}\nRUN echo before-the-failure {app}\nRUN exit 7\n"
    )
    output: list[str] = []
    try:
        with pytest.raises(ImageError) as caught:
            await docker_runtime.build_image(
                tmp_path, Path("Dockerfile"), "dockyard-test-fails:x", {}, output.append
            )
    finally:
        # The steps that succeeded stay behind as untagged layers: remove those we made.
        base_id = (await docker_cli("image", "inspect", "-f", "{{.Id}}", busybox_image)).strip()
        made = {line[6:] for line in output if re.fullmatch(r" ---> [0-9a-f]{12}", line)}
        made = {image for image in made if not base_id.startswith(f"sha256:{image}")}
        if made:
            await docker_cli("image", "rm", *made)
    message = str(caught.value)
    assert re.search(r"at 'Step 3/\d+ : RUN exit 7'", message)
    assert "returned a non-zero code: 7" in message
    assert "before-the-failure" in message
    assert await docker_runtime.image_id("dockyard-test-fails:x") is None
    # forcerm: the failed step's intermediate container is gone too.
    # One listing (other tests' containers come and go between two calls).
    commands = await docker_cli(
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        f"ancestor={busybox_image}",
        "--format",
        "{{.Command}}",
    )
    assert "exit 7" not in commands


async def test_ensure_image_builds_only_on_change(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str], tmp_path: Path
) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(f"FROM {busybox_image}\nCOPY . /app\n")
    (tmp_path / "app.txt").write_text("v1\n")
    (tmp_path / ".dockyard").mkdir()
    (tmp_path / ".dockyard" / "state.db").write_text("changes all the time")
    app = test_labels["dockyard.app"]
    output: list[str] = []

    async def ensure(**overrides: object) -> str:
        args: dict = {
            "app": app,
            "class_name": "MyContainer",
            "image": "./Dockerfile",
            "dockerfile": dockerfile,
            "context": tmp_path,
            "build_args": {},
            "on_output": output.append,
            **overrides,
        }
        return await ensure_image(docker_runtime, **args)

    first = await ensure()
    assert first.startswith(f"dockyard-{app}-mycontainer:")
    assert output, "the first call builds"

    output.clear()
    (tmp_path / ".dockyard" / "state.db").write_text("changed, but not part of the build")
    assert await ensure() == first
    assert output == [], "nothing changed: no build"

    (tmp_path / "app.txt").write_text("v2\n")
    second = await ensure()
    assert second != first and output, "a changed file rebuilds"

    output.clear()
    third = await ensure(build_args={"X": "1"})
    assert third not in (first, second) and output, "changed build args rebuild"

    # A missing FROM image is reported before the builder would try a registry.
    dockerfile.write_text("ARG BASE=python:3.12-slim\nFROM ${BASE}\n")
    with pytest.raises(ImageError, match=r"FROM 'python:3.12-slim'.*pulls only references"):
        await ensure()
    assert await ensure(build_args={"BASE": busybox_image}) not in (first, second, third)

    # An image reference without a registry host is only checked, never built or pulled.
    # A referenced image runs by its id, so a tag that moves later changes nothing here.
    assert await ensure(dockerfile=None, image=busybox_image) == await docker_runtime.image_id(
        busybox_image
    )
    with pytest.raises(ImageError, match="pulls only references that name a registry host"):
        await ensure(dockerfile=None, image="dockyard/not-here:1")


def test_context_files_skip_dockyard_state_and_honour_dockerignore(tmp_path: Path) -> None:
    for name in ["a.txt", "b.log", "keep.log", "src/m.py", "src/__pycache__/m.pyc"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    for name in [".git/HEAD", ".dockyard/x", ".venv/bin/python", "build/out/x.o"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / ".dockerignore").write_text("# comment\n*.log\n!keep.log\nbuild\n")
    names = [name for name, _ in context_files(tmp_path)]
    assert names == [".dockerignore", "a.txt", "keep.log", "src", "src/m.py"]


def test_base_images_resolves_args_and_skips_stages() -> None:
    dockerfile = (
        "ARG BASE=python:3.12-slim\n"
        "FROM ${BASE} AS build\n"
        "FROM build\n"
        "FROM scratch\n"
        "FROM --platform=linux/amd64 dockyard/busybox:latest AS tools\n"
        "FROM $UNKNOWN\n"
    )
    assert base_images(dockerfile, {}) == ["python:3.12-slim", "dockyard/busybox:latest"]
    assert base_images(dockerfile, {"BASE": "local:1"})[0] == "local:1"


async def test_no_internet_keeps_published_ports(
    busybox_image: str, test_labels: dict[str, str]
) -> None:
    network = f"dockyard-test-{test_labels['dockyard.app']}"
    async with DockerRuntime(no_internet_network=network) as runtime:
        try:
            info = await runtime.run(
                spec(busybox_image, test_labels, HTTPD, ports=[8080], enable_internet=False)
            )
            try:
                url = f"http://127.0.0.1:{info.host_ports[8080]}/"
                assert await http_get_when_ready(url) == "hello\n"
                raw = await engine_inspect(info.id)
                assert raw["HostConfig"]["NetworkMode"] == network
            finally:
                await runtime.remove(info.id)
            options = await docker_cli(
                "network", "inspect", network, "--format", "{{json .Options}}"
            )
            assert '"com.docker.network.bridge.enable_ip_masquerade":"false"' in options
            # Neighbours on the no-internet network cannot reach each other either.
            assert '"com.docker.network.bridge.enable_icc":"false"' in options
        finally:
            # Also removes the firewall rule that came with it.
            await runtime.remove_no_internet_network()
        assert network not in await docker_cli("network", "ls", "--format", "{{.Name}}")


async def test_disk_limit_applied_or_skipped(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    assert docker_runtime.capabilities.disk_limit is None
    info = await docker_runtime.run(spec(busybox_image, test_labels, ["true"], disk_mb=100))
    assert (await docker_runtime.wait(info.id)).exit_code == 0
    supported = docker_runtime.capabilities.disk_limit
    assert supported is not None
    raw = await engine_inspect(info.id)
    assert bool(raw["HostConfig"].get("StorageOpt")) == supported


async def test_engine_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    socket = tmp_path / "no-such-engine.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket}")
    async with DockerRuntime() as runtime:
        with pytest.raises(EngineUnavailable) as caught:
            await runtime.inspect("anything")
        # The log's message says where and what to check; a client sees neither.
        assert str(socket) in str(caught.value) and "docker info" in str(caught.value)
        assert caught.value.address == f"unix://{socket}"
        assert caught.value.public == "engine unavailable"
        with pytest.raises(EngineUnavailable):
            await runtime.run(ContainerSpec(image="x"))


async def test_python_image_runs_python(
    docker_runtime: DockerRuntime, python_image: str, test_labels: dict[str, str]
) -> None:
    code = "import sys; print(sys.version_info[0])"
    info = await docker_runtime.run(spec(python_image, test_labels, ["python3", "-c", code]))
    assert (await docker_runtime.wait(info.id)).exit_code == 0
    assert [line async for line in docker_runtime.logs(info.id)] == ["3"]


async def test_concurrent_runs(
    docker_runtime: DockerRuntime, busybox_image: str, test_labels: dict[str, str]
) -> None:
    infos = await asyncio.gather(
        *(
            docker_runtime.run(spec(busybox_image, test_labels, HTTPD, ports=[8080]))
            for _ in range(3)
        )
    )
    ports = {info.host_ports[8080] for info in infos}
    assert len(ports) == 3
    for port in ports:
        assert await http_get_when_ready(f"http://127.0.0.1:{port}/") == "hello\n"
