"""A bounded chaos run through the real gateway, app and engine, in this process:
clients that vanish at random points and workers that give up at random must leave
nothing behind (no container awake, no object pinned, no task pending, no memory kept)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import gc
import json
import os
import random
import shutil
import traceback
from pathlib import Path

import pytest
import uvloop

from dockyard.app import App
from dockyard.containers.docker import DockerRuntime
from dockyard.gateway.server import Gateway
from dockyard.settings import ObjectSettings, Settings
from tests.support.engine import app_name, wait_until
from tests.support.projects import IMAGES

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SLEEP_AFTER = 3.0
REQUESTS = 2000
CONCURRENCY = 24

WORKER = """
import asyncio

from dockyard import Container, Request, Response, get_container


class Web(Container):
    default_port = 8080
    sleep_after = {sleep_after!r}


class Echo(Container):
    default_port = 8080
    sleep_after = {sleep_after!r}


async def fetch(request, env, ctx):
    parts = request.path.strip("/").split("/")
    stub = get_container(getattr(env, parts[1]), parts[2])
    url = "http://container/" + "/".join(parts[3:])
    body = request.stream() if request.has_body else None
    forwarded = Request(url, method=request.method, headers=request.headers, body=body)
    timeout = request.headers.get("x-worker-timeout")
    if timeout:
        try:
            async with asyncio.timeout(float(timeout)):
                return await stub.fetch(forwarded)
        except TimeoutError:
            return Response("worker gave up\\n", status=504)
    return await stub.fetch(forwarded)
"""


def write_project(root: Path) -> str:
    name = app_name()
    root.mkdir(parents=True)
    (root / "worker.py").write_text(WORKER.format(sleep_after=f"{int(SLEEP_AFTER)}s"))
    shutil.copytree(IMAGES / "web", root / "web")
    shutil.copytree(IMAGES / "echo", root / "echo")
    config = {
        "name": name,
        "main": "worker.py",
        "containers": [
            {"class_name": "Web", "image": "./web/Dockerfile"},
            {
                "class_name": "Echo",
                "image": "./echo/Dockerfile",
                "image_vars": {"BASE": "dockyard/python:bookworm"},
            },
        ],
        "durable_objects": {
            "bindings": [
                {"name": "WEB", "class_name": "Web"},
                {"name": "ECHO", "class_name": "Echo"},
            ]
        },
        "migrations": [{"tag": "v1", "new_sqlite_classes": ["Web", "Echo"]}],
    }
    (root / "wrangler.jsonc").write_text(json.dumps(config))
    return name


def rss_kib() -> int:
    """Resident memory after a collection, with the allocator's free pages handed back:
    what the process still holds, not glibc's cache of pages it will reuse."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Client:
    """One raw HTTP/1.1 client that may vanish at any point of its exchange."""

    def __init__(self, port: int, rng: random.Random) -> None:
        self.port = port
        self.rng = rng

    async def run(self, i: int) -> None:
        rng = self.rng
        vanish = rng.random() < 1 / 3
        timeout = rng.random() < 1 / 10
        kind = rng.choice(["small", "small", "big", "upload", "websocket"])
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            extra = f"x-worker-timeout: {rng.uniform(0.001, 0.05):.3f}\r\n" if timeout else ""
            if kind == "websocket":
                await self._websocket(reader, writer, i, vanish, extra)
                return
            name = f"n{i % 6}"
            if kind == "upload":
                size = rng.randint(1, 200_000)
                head = (
                    f"POST /c/WEB/{name}/cgi-bin/count HTTP/1.1\r\nHost: x\r\n{extra}"
                    f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode())
                sent = rng.randint(0, size) if vanish else size
                writer.write(b"u" * sent)
                await writer.drain()
                if vanish:
                    return
            else:
                path = "big" if kind == "big" else ""
                head = f"GET /c/WEB/{name}/{path} HTTP/1.1\r\nHost: x\r\n{extra}"
                writer.write((head + "Connection: close\r\n\r\n").encode())
                await writer.drain()
            if vanish:
                await reader.read(rng.randint(1, 300_000))
                return
            while await reader.read(1 << 20):
                pass
        finally:
            writer.transport.abort()

    async def _websocket(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        i: int,
        vanish: bool,
        extra: str,
    ) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /c/ECHO/e{i % 3}/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101") or (vanish and self.rng.random() < 0.5):
            return
        for _ in range(self.rng.randint(1, 5)):
            payload = os.urandom(self.rng.randint(1, 100))
            mask = os.urandom(4)
            masked = bytes(b ^ mask[j % 4] for j, b in enumerate(payload))
            writer.write(bytes([0x82, 0x80 | len(payload)]) + mask + masked)
            await writer.drain()
            await reader.read(4096)
        if not vanish:
            mask = os.urandom(4)
            writer.write(bytes([0x88, 0x80]) + mask)
            await writer.drain()
            await reader.read(4096)


def test_chaos_leaves_no_container_awake_no_object_pinned_no_task_pending(
    tmp_path: Path, busybox_image: str, python_image: str
) -> None:
    # On the loop `dockyard dev` runs on: the chaos is judged on the real transports.
    uvloop.run(chaos(tmp_path))


async def chaos(tmp_path: Path) -> None:
    app_name = write_project(tmp_path / "app")
    settings = Settings(objects=ObjectSettings(idle_timeout=1.0))
    rng = random.Random(20261128)
    # Whatever the loop would report as unhandled (a future's exception never retrieved,
    # a task's exception never retrieved) is a fault of the request path.
    unhandled: list[str] = []

    def report(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        error = context.get("exception")
        where = (
            "".join(traceback.format_exception(error)) if isinstance(error, BaseException) else ""
        )
        unhandled.append(f"{context.get('message')}: {error!r}\n{where}")

    asyncio.get_running_loop().set_exception_handler(report)
    async with App(tmp_path / "app", settings=settings) as app, DockerRuntime() as engine:
        gateway = Gateway(app.handle, host="127.0.0.1", port=0)
        port = await gateway.start()
        try:
            client = Client(port, rng)
            # Warm up with the same mix (every object's container, the pools, the caches),
            # so the baseline holds what stays whatever the load.
            warm = Client(port, random.Random(1))
            for i in range(200):
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    await asyncio.wait_for(warm.run(i), 30)
            baseline_tasks = set(asyncio.all_tasks())
            baseline_rss = rss_kib()

            queue = iter(range(REQUESTS))

            async def worker() -> None:
                for i in queue:
                    try:
                        await asyncio.wait_for(client.run(i), 30)
                    except (OSError, asyncio.IncompleteReadError, TimeoutError):
                        pass

            async with asyncio.timeout(240):
                await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            ended = asyncio.get_running_loop().time()

            manager = app.containers
            assert manager is not None

            async def put_to_sleep() -> bool:
                # Every container is stopping or stopped: the sleep was decided.
                phases = manager.live_phases()
                return not {"running", "healthy", "starting"} & phases.keys()

            await wait_until(put_to_sleep, within=SLEEP_AFTER + 2 + 15, interval=0.05)
            slept_after = asyncio.get_running_loop().time() - ended
            assert slept_after <= SLEEP_AFTER + 2, f"containers slept {slept_after:.1f}s after"

            async def all_stopped() -> bool:
                infos = await engine.list({"dockyard.app": app_name})
                return not [i for i in infos if i.running]

            await wait_until(all_stopped, within=15, interval=0.1)

            async def unpinned() -> bool:
                return app.host.live_count() == 0 and app.host.statistics().in_flight == 0

            await wait_until(unpinned, within=10, interval=0.1)

            async def settled() -> bool:
                left = set(asyncio.all_tasks()) - baseline_tasks - {asyncio.current_task()}
                return not left

            await wait_until(settled, within=10, interval=0.1)
            growth_mib = (rss_kib() - baseline_rss) / 1024  # collects, so it runs first
            assert unhandled == [], f"{len(unhandled)} unhandled, e.g.\n" + "\n".join(unhandled[:3])

            print(f"\nchaos: put to sleep {slept_after:.2f} s after; RSS {growth_mib:+.1f} MiB")
            assert growth_mib < 10, f"RSS grew {growth_mib:.1f} MiB over the chaos run"
        finally:
            await gateway.stop()
