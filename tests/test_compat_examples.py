"""The examples/cf-* projects (the shapes of Cloudflare's Python Workers examples), each
served by a real `dockyard dev` and checked byte for byte.

FastAPI, Jinja2 and Django come from the test environment (the `dev` extra), which
satisfies the examples' pyproject.toml dependencies: nothing is installed, and no test
reaches a package index.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.compat import request
from tests.support.devserver import DevServer

EXAMPLES = Path(__file__).parent.parent / "examples"
TEXT = "text/plain;charset=UTF-8"
HTML = "text/html; charset=utf-8"
# Were anything to be installed, uv would fail rather than reach out.
NO_INDEX = {"UV_OFFLINE": "1"}


def example(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(EXAMPLES / name, target, ignore=shutil.ignore_patterns(".dockyard"))
    return target


async def test_hello(tmp_path: Path) -> None:
    with DevServer(example("cf-hello", tmp_path)) as server:
        assert (await request(server.url + "/"))[:3] == (200, TEXT, b"Hello World!")


async def test_kv(tmp_path: Path) -> None:
    with DevServer(example("cf-kv", tmp_path)) as server:
        assert (await request(server.url + "/"))[:3] == (200, TEXT, b"baz")


async def test_fastapi_with_jinja2_and_a_var(tmp_path: Path) -> None:
    with DevServer(example("cf-fastapi", tmp_path), env=NO_INDEX) as server:
        assert (await request(server.url + "/"))[:3] == (
            200,
            HTML,
            b"<h1>Hello from FastAPI</h1>\n<ul><li>a</li><li>b</li></ul>",
        )
        assert "Installing" not in server.output
        assert (await request(server.url + "/items/7?q=x"))[:3] == (
            200,
            "application/json",
            b'{"item_id":7,"q":"x"}',
        )
        status, kind, body, _ = await request(server.url + "/items/nope")
        assert (status, kind) == (422, "application/json")
        assert json.loads(body)["detail"][0]["loc"] == ["path", "item_id"]


async def test_d1_after_execute_file(tmp_path: Path) -> None:
    project = example("cf-d1", tmp_path)
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "dockyard",
            "d1",
            "execute",
            "quotes",
            "--local",
            "--file",
            "schema.sql",
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    with DevServer(project) as server:
        assert (await request(server.url + "/"))[:3] == (
            200,
            "application/json",
            b'{"quote": "Talk is cheap. Show me the code.", "author": "Linus Torvalds"}',
        )


async def test_static_assets(tmp_path: Path) -> None:
    with DevServer(example("cf-assets", tmp_path)) as server:
        assert (await request(server.url + "/"))[:3] == (
            200,
            HTML,
            b'<!doctype html><title>cf-assets</title><script src="/app.js"></script>\n',
        )
        assert (await request(server.url + "/app.js"))[:3] == (
            200,
            "text/javascript; charset=utf-8",
            b'console.log("hello from a static file");\n',
        )
        assert (await request(server.url + "/api/time"))[:3] == (
            200,
            "application/json",
            b'{"path": "/api/time"}',
        )
        assert (await request(server.url + "/missing.png"))[:3] == (404, None, b"")


async def test_durable_object_list(tmp_path: Path) -> None:
    with DevServer(example("cf-durable-objects", tmp_path)) as server:
        assert (await request(server.url + "/groceries", "POST", data="milk"))[:3] == (
            200,
            "application/json",
            b'["milk"]',
        )
        assert (await request(server.url + "/groceries", "POST", data="eggs"))[2] == (
            b'["milk", "eggs"]'
        )
        assert (await request(server.url + "/other"))[2] == b"[]"
        assert (await request(server.url + "/groceries"))[2] == b'["milk", "eggs"]'


async def test_django_through_wsgi(tmp_path: Path) -> None:
    with DevServer(example("cf-django", tmp_path), env=NO_INDEX) as server:
        assert (await request(server.url + "/"))[:3] == (
            200,
            HTML,
            b"Hello from Django on dockyard",
        )
        assert (await request(server.url + "/items/3", "DELETE"))[:3] == (
            200,
            "application/json",
            b'{"item_id": 3, "method": "DELETE"}',
        )
        status, kind, _, _ = await request(server.url + "/nowhere")
        assert (status, kind) == (404, HTML)


@pytest.mark.slow
async def test_cron(tmp_path: Path) -> None:
    # The minute's own run is tested in test_compat_cron; here wrangler's test route.
    with DevServer(example("cf-cron", tmp_path), "--test-scheduled") as server:
        assert (await request(server.url + "/"))[:3] == (
            200,
            TEXT,
            b"the cron runs in the background",
        )
        ran = await request(server.url + "/__scheduled?cron=*/5+*+*+*+*&time=1800000000000")
        assert ran[0] == 200 and ran[2] == b"Ran scheduled event\n"
        server.wait_for(r"cron processed: \*/5 \* \* \* \* at 1800000000000$", timeout=10)
        # Without a cron, the config's first; newer wrangler's path answers too.
        ran = await request(server.url + "/cdn-cgi/handler/scheduled")
        assert ran[0] == 200
        server.wait_for(r"cron processed: \* \* \* \* \* at \d+$", timeout=10)


async def test_the_scheduled_test_route_is_off_unless_asked_for(tmp_path: Path) -> None:
    with DevServer(example("cf-cron", tmp_path)) as server:
        status, _, body, *_ = await request(server.url + "/__scheduled?cron=*+*+*+*+*")
    # The worker's own answer: without --test-scheduled the path is the app's.
    assert (status, body) == (200, b"the cron runs in the background")
