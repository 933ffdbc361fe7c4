"""``dockyard dev`` as users run it: a real process serving real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from dockyard._limits import YOUNG_COLLECTION_THRESHOLD
from tests.support.devserver import DevServer

MODULE_WORKER = """
from dockyard import Response

async def fetch(request, env, ctx):
    if request.path == "/boom":
        raise RuntimeError("worker exploded")
    if request.path == "/env":
        return Response.json({"greeting": env.GREETING, "token": env.TOKEN})
    return Response("module form says hi")
"""

CLASS_WORKER = """
from dockyard import Response, WorkerEntrypoint

class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return Response(f"class form, {self.env.GREETING}, {request.method} {request.path}")
"""

STREAM_WORKER = """
from dockyard import Response

CHUNK = b"x" * 65536

async def fetch(request, env, ctx):
    if request.path == "/upload":
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return Response(str(size))
    if request.path == "/download":
        total = int(request.query["bytes"])
        async def body():
            sent = 0
            while sent < total:
                piece = CHUNK[: total - sent]
                sent += len(piece)
                yield piece
        return Response(body(), headers={"content-type": "application/octet-stream"})
    if request.path == "/echo":
        return Response(request.stream())
    return Response("ok")
"""


def make_project(root: Path, worker: str, *, name: str = "probe") -> Path:
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "src" / "main.py").write_text(textwrap.dedent(worker))
    (root / "wrangler.jsonc").write_text(
        textwrap.dedent(
            f"""\
            {{
              // a project with no containers: the worker answers alone
              "name": "{name}",
              "main": "src/main.py",
              "compatibility_date": "2026-11-01",
              "vars": {{"GREETING": "hello"}},
            }}
            """
        )
    )
    (root / ".dev.vars").write_text("TOKEN=s3cret\n")
    return root


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def test_module_form_vars_secrets_and_errors(tmp_path: Path) -> None:
    with DevServer(make_project(tmp_path, MODULE_WORKER)) as server:
        assert await get(server.url + "/") == (200, "module form says hi")
        status, body = await get(server.url + "/env")
        assert status == 200 and '"token": "s3cret"' in body and '"greeting": "hello"' in body
        # An exception: the client gets a bare 500, the console gets the traceback ...
        status, body = await get(server.url + "/boom")
        assert status == 500
        assert "worker exploded" not in body and "Traceback" not in body
        server.wait_for("RuntimeError: worker exploded")
        # ... and the server keeps serving.
        assert await get(server.url + "/") == (200, "module form says hi")


ACCESS_LINE = re.compile(r"^\d\d:\d\d:\d\d (GET|POST) (\S+) (\d{3}) \(\d+\.\d ms\)$")


async def test_each_answer_prints_one_access_line_in_order(tmp_path: Path) -> None:
    project = make_project(tmp_path, MODULE_WORKER)
    with DevServer(project) as server:
        assert (await get(server.url + "/"))[0] == 200
        assert (await get(server.url + "/boom"))[0] == 500
        assert (await get(server.url + "/env?q=1"))[0] == 200
        # A path a client encoded to forge a console line, and clear the screen: printed
        # as it came, still encoded.
        forged = URL(server.url + "/x%0A12:00:00%20GET%20/admin%20200%1B%5B2J", encoded=True)
        async with aiohttp.ClientSession() as session, session.get(forged) as response:
            assert response.status == 200
        server.wait_for(r"GET /x%0A12:00:00%20GET%20/admin%20200%1B%5B2J 200 \(")
        lines = server.lines
    assert not any("\x1b" in line or line.startswith("12:00:00 GET /admin") for line in lines)
    access = [m.groups() for line in lines if (m := ACCESS_LINE.match(line.strip()))]
    assert access == [
        ("GET", "/", "200"),
        ("GET", "/boom", "500"),
        ("GET", "/env", "200"),
        ("GET", "/x%0A12:00:00%20GET%20/admin%20200%1B%5B2J", "200"),
    ]
    # The worker's traceback is printed before the line of the answer it became.
    boom = next(i for i, line in enumerate(lines) if "GET /boom 500" in line)
    assert any("RuntimeError: worker exploded" in line for line in lines[:boom]), lines
    with DevServer(project, "--no-access-log") as server:
        assert (await get(server.url + "/"))[0] == 200
        assert (await get(server.url + "/boom"))[0] == 500
        server.wait_for("RuntimeError: worker exploded")
        assert not [line for line in server.lines if ACCESS_LINE.match(line.strip())]


async def test_class_form(tmp_path: Path) -> None:
    with DevServer(make_project(tmp_path, CLASS_WORKER)) as server:
        assert await get(server.url + "/x") == (200, "class form, hello, GET /x")


async def test_sigterm_exits_zero(tmp_path: Path) -> None:
    server = DevServer(make_project(tmp_path, MODULE_WORKER)).start()
    assert server.stop(signal.SIGTERM) == 0
    server = DevServer(make_project(tmp_path, MODULE_WORKER)).start()
    assert server.stop(signal.SIGINT) == 0


async def test_bad_config_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    make_project(tmp_path, MODULE_WORKER)
    (tmp_path / "wrangler.jsonc").write_text('{"name": "probe", "main": "src/missing.py"}')
    server = DevServer(tmp_path)
    with pytest.raises(AssertionError):
        server.start(timeout=30)
    assert server.stop() == 2
    assert "missing.py" in server.output and "Traceback" not in server.output


async def test_hot_reload_within_two_seconds(tmp_path: Path) -> None:
    project = make_project(tmp_path, MODULE_WORKER)
    with DevServer(project) as server:
        pid = server.proc.pid  # type: ignore[union-attr]
        assert (await get(server.url + "/"))[1] == "module form says hi"
        main = project / "src" / "main.py"
        main.write_text(main.read_text().replace("module form says hi", "edited answer"))
        written = time.monotonic()
        while (await get(server.url + "/"))[1] != "edited answer":
            assert time.monotonic() - written < 2.0, "reload took longer than 2 s"
            await asyncio.sleep(0.02)
        # Same process: reloading never restarts the server.
        assert server.proc.pid == pid and server.proc.poll() is None  # type: ignore[union-attr]
        # A broken edit keeps the previous worker serving.
        main.write_text("def broken(:\n")
        server.wait_for("Reload failed")
        assert (await get(server.url + "/"))[1] == "edited answer"


FIFTY_MB = 50 * 1024 * 1024


async def test_streams_50_mb_both_ways_without_buffering(tmp_path: Path) -> None:
    with DevServer(make_project(tmp_path, STREAM_WORKER)) as server:
        await get(server.url + "/")
        baseline = server.rss_kib()

        async def upload_body():  # type: ignore[no-untyped-def]
            chunk = os.urandom(1024 * 1024)
            for _ in range(50):
                yield chunk

        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/upload", data=upload_body()) as response:
                assert response.status == 200
                assert int(await response.text()) == FIFTY_MB
            received = 0
            async with session.get(server.url + f"/download?bytes={FIFTY_MB}") as response:
                assert response.status == 200
                async for chunk in response.content.iter_chunked(1 << 20):
                    received += len(chunk)
            assert received == FIFTY_MB
            echoed = 0
            async with session.post(server.url + "/echo", data=upload_body()) as response:
                async for chunk in response.content.iter_chunked(1 << 20):
                    echoed += len(chunk)
            assert echoed == FIFTY_MB
        # Peak resident memory of the server over the whole test: far below one body.
        growth_mib = (server.peak_rss_kib() - baseline) / 1024
        assert growth_mib < 20, f"server grew by {growth_mib:.1f} MiB while streaming 50 MB"


async def test_a_second_dev_on_the_same_project_is_refused(tmp_path: Path) -> None:
    project = make_project(tmp_path, MODULE_WORKER)
    with DevServer(project) as first:
        second = DevServer(project)
        with pytest.raises(AssertionError):
            second.start(timeout=30)
        assert second.stop() == 1
        assert "is in use by dockyard dev (pid" in second.output
        assert (await get(first.url + "/"))[1] == "module form says hi"


HEAP_WORKER = """
import builtins
import gc
import weakref

from dockyard import Response

ANSWER = "first"


class Ring:
    # A cycle only the collector frees, made at import: a reload must not keep it forever.
    def __init__(self):
        self.me = self


RING = Ring()
builtins.__dict__.setdefault("dockyard_test_rings", []).append(weakref.ref(RING))


async def fetch(request, env, ctx):
    alive = sum(ring() is not None for ring in builtins.dockyard_test_rings)
    return Response.json({"answer": ANSWER, "young": gc.get_threshold()[0],
                          "frozen": gc.get_freeze_count(), "rings": alive})
"""


async def test_dev_keeps_its_loaded_heap_out_of_collections_but_not_past_a_reload(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path, HEAP_WORKER)
    with DevServer(project) as server:
        status, body = await get(server.url + "/")
        heap = json.loads(body)
        assert status == 200 and heap["young"] == YOUNG_COLLECTION_THRESHOLD
        assert heap["frozen"] > 10_000 and heap["rings"] == 1
        main = project / "src" / "main.py"
        main.write_text(main.read_text().replace('"first"', '"second"'))
        server.wait_for("Reloaded the worker")
        heap = json.loads((await get(server.url + "/"))[1])
        # The first module (and its ring) is unreachable and was frozen: the reload
        # unfroze and collected it, then froze what the second one loaded.
        assert heap["answer"] == "second" and heap["rings"] == 1, heap
