"""The event-loop watchdog: a blocked loop is reported with the code that blocks it, and a
stop signal is honoured even while the loop cannot act on it.

In-process tests drive ``LoopWatchdog`` directly; the slow ones run a real ``dockyard
dev`` whose worker spins the CPU without awaiting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from dockyard.containers.docker import DockerRuntime
from dockyard.watchdog import LoopWatchdog
from tests.support.devserver import DevServer
from tests.support.projects import make_project

WORKER = """\
import time

from dockyard import Response


async def fetch(request, env, ctx):
    if request.path == "/spin":
        seconds = float(request.query.get("s", "5"))
        print("spinning", flush=True)
        end = time.time() + seconds
        while time.time() < end: pass  # SPIN: one line, so every sample names it
        return Response("spun\\n")
    return Response("ok\\n")
"""


def spin_line() -> int:
    return next(i for i, line in enumerate(WORKER.splitlines(), 1) if "# SPIN" in line)


def block(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def test_a_blocked_loop_is_reported_once_with_the_blocking_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    logger = logging.getLogger("test.watchdog")
    watchdog = LoopWatchdog(loop, stall_after=0.3, source_root=Path(__file__).parent, log=logger)
    watchdog.start()
    try:
        with caplog.at_level(logging.WARNING, logger="test.watchdog"):
            await asyncio.sleep(0.5)  # a turning loop is never reported
            assert caplog.records == []
            block(1.2)
            await asyncio.sleep(0.3)  # lets the loop beat again, so the recovery is logged
    finally:
        watchdog.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    # The spin is its `while` line and its `pass` line: the report names one of the two.
    first = block.__code__.co_firstlineno
    where = re.search(r"at (\S+):(\d+);", messages[0])
    assert where is not None, messages[0]
    assert where.group(1) == __file__
    assert int(where.group(2)) in (first + 2, first + 3)
    assert "in block" in messages[0]
    assert "runs again after being blocked" in messages[1]
    assert watchdog.stalls == 1


async def test_a_signal_the_stuck_loop_cannot_handle_ends_the_process() -> None:
    loop = asyncio.get_running_loop()
    exits: list[int] = []
    exited = threading.Event()

    def fake_exit(code: int) -> None:
        exits.append(code)
        exited.set()

    previous = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, lambda *_: None)
    watchdog = LoopWatchdog(loop, stall_after=0.2, signal_grace=0.5, exit=fake_exit)
    watchdog.watch_signals([signal.SIGUSR1])
    watchdog.start()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        started = time.monotonic()
        while not exited.is_set() and time.monotonic() - started < 5:
            pass  # the loop is stuck here; the handler still runs between bytecodes
        took = time.monotonic() - started
    finally:
        watchdog.stop()
        signal.signal(signal.SIGUSR1, previous)
    assert exits == [128 + signal.SIGUSR1]
    assert 0.5 <= took < 2.0


async def test_a_handled_signal_does_not_end_a_turning_loop() -> None:
    loop = asyncio.get_running_loop()
    exits: list[int] = []
    received = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, received.set)
    watchdog = LoopWatchdog(loop, stall_after=0.2, signal_grace=0.3, exit=exits.append)
    watchdog.watch_signals([signal.SIGUSR1])
    watchdog.start()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.wait_for(received.wait(), 5)
        await asyncio.sleep(1.0)  # well past the grace: the loop turned all along
    finally:
        watchdog.stop()
        loop.remove_signal_handler(signal.SIGUSR1)
    assert exits == []


def project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "worker.py").write_text(WORKER)
    (root / "wrangler.jsonc").write_text('{"name": "spin", "main": "worker.py"}\n')
    return root


def get_in_background(url: str) -> threading.Thread:
    def get() -> None:
        try:
            urllib.request.urlopen(url, timeout=60).read()
        except OSError:
            pass  # the server may be gone by then: that is the point of one test

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_dev_reports_a_worker_that_blocks_the_loop(tmp_path: Path) -> None:
    with DevServer(project(tmp_path / "app")) as dev:
        get_in_background(f"{dev.url}/spin?s=5")
        dev.wait_for(r"^spinning$", 10)
        began = time.monotonic()
        match = dev.wait_for(r"blocked for [\d.]+ s at (\S+):(\d+)", 5)
        reported = time.monotonic() - began
        assert Path(match.group(1)).name == "worker.py"
        assert int(match.group(2)) == spin_line()
        dev.wait_for(r"runs again after being blocked", 10)
        print(f"spin began -> blocked-loop report: {reported * 1000:.0f} ms")
        assert reported < 2.5  # 1 s, then the report competes for the GIL with the spin
        assert len(re.findall(r"blocked for [\d.]+ s at", dev.output)) == 1


@pytest.mark.slow
def test_dev_honours_sigterm_while_a_worker_blocks_the_loop(tmp_path: Path) -> None:
    dev = DevServer(project(tmp_path / "app")).start()
    assert dev.proc is not None
    get_in_background(f"{dev.url}/spin?s=30")
    dev.wait_for(r"^spinning$", 10)
    dev.wait_for(r"blocked for", 5)
    began = time.monotonic()
    code = dev.stop(signal.SIGTERM, timeout=20)
    took = time.monotonic() - began
    print(f"SIGTERM during a 30 s spin -> exit {code} after {took:.2f} s (grace 5 s)")
    assert code == 128 + signal.SIGTERM
    assert "SIGTERM was not handled within 5 s" in dev.output
    assert f'worker.py", line {spin_line()}' in dev.output
    assert took < 5 + 3


def with_spin_route(worker: Path) -> None:
    """Put a /spin route in front of a container test project's worker."""
    source = worker.read_text().replace("async def fetch(", "async def _fetch(")
    worker.write_text(
        "import time as _time\n\n" + source + "\n\nasync def fetch(request, env, ctx):\n"
        "    if request.path == '/spin':\n"
        "        print('spinning', flush=True)\n"
        "        end = _time.time() + 30\n"
        "        while _time.time() < end: pass\n"
        "        return Response('spun')\n"
        "    return await _fetch(request, env, ctx)\n"
    )


@pytest.mark.slow
@pytest.mark.docker
async def test_containers_left_by_a_forced_exit_are_adopted_by_the_next_dev(
    tmp_path: Path, busybox_image: str, docker_runtime: DockerRuntime
) -> None:
    project = make_project(tmp_path / "app", {"Web": {}})
    with_spin_route(project.root / "worker.py")
    try:
        dev = DevServer(project.root)
        await asyncio.to_thread(dev.start)
        body = await asyncio.to_thread(http_get, f"{dev.url}/c/WEB/a/cgi-bin/env")
        [before] = await docker_runtime.list(project.labels)
        get_in_background(f"{dev.url}/spin")
        await asyncio.to_thread(dev.wait_for, r"^spinning$", 10)
        code = await asyncio.to_thread(dev.stop, signal.SIGTERM, 20)
        assert code == 128 + signal.SIGTERM
        # A stuck loop could not stop it: it still runs, labelled as this folder's.
        still = await docker_runtime.inspect(before.id)
        assert still is not None and still.running

        with DevServer(project.root) as again:
            again_body = await asyncio.to_thread(http_get, f"{again.url}/c/WEB/a/cgi-bin/env")
            assert hostname_of(again_body) == hostname_of(body) == before.id[:12]
            assert [c.id for c in await docker_runtime.list(project.labels)] == [before.id]
        assert await docker_runtime.list(project.labels) == []
    finally:
        for info in await docker_runtime.list(project.labels):
            await docker_runtime.remove(info.id)


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def hostname_of(env_dump: str) -> str:
    found = re.search(r"^HOSTNAME=(\S+)$", env_dump, re.MULTILINE)
    assert found is not None, env_dump
    return found.group(1)
