"""Static assets (`assets`): routing, content types, ETag/304, Range, traversal refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.compat import cf_project, request
from tests.support.devserver import DevServer

ASSETS_WORKER = """
from workers import Response, WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        if request.path.startswith("/api/"):
            return Response.json({"api": request.path})
        if request.path == "/via-binding":
            return await self.env.ASSETS.fetch("http://assets.local/about")
        if request.path == "/binding-missing":
            return await self.env.ASSETS.fetch(request.js_object)
        return Response("worker " + request.path, status=404)
"""

FILES = {
    "public/index.html": "<h1>home</h1>",
    "public/about.html": "<h1>about</h1>",
    "public/docs/index.html": "<h1>docs</h1>",
    "public/docs/404.html": "docs page not found",
    "public/404.html": "site page not found",
    "public/app.js": "console.log(1)",
    "public/style.css": "body{}",
    "public/data.json": '{"a":1}',
    "public/favicon.ico": "ico",
    "public/logo.svg": "<svg/>",
    "public/blob.bin": "0123456789",
    "public/api/static.txt": "static, but the worker runs first for /api/*",
    "secret.txt": "outside the assets folder",
}


def project(tmp_path: Path, **assets: object) -> Path:
    config = {"assets": {"directory": "./public", "binding": "ASSETS", **assets}}
    return cf_project(tmp_path, ASSETS_WORKER, config, files=FILES)


async def test_content_types_and_routing(tmp_path: Path) -> None:
    with DevServer(project(tmp_path, run_worker_first=["/api/*"])) as server:
        url = server.url
        expected = {
            "/": ("text/html; charset=utf-8", b"<h1>home</h1>"),
            "/about": ("text/html; charset=utf-8", b"<h1>about</h1>"),
            "/docs/": ("text/html; charset=utf-8", b"<h1>docs</h1>"),
            "/app.js": ("text/javascript; charset=utf-8", b"console.log(1)"),
            "/style.css": ("text/css; charset=utf-8", b"body{}"),
            "/data.json": ("application/json; charset=utf-8", b'{"a":1}'),
            "/favicon.ico": ("image/vnd.microsoft.icon", b"ico"),
            "/logo.svg": ("image/svg+xml", b"<svg/>"),
            "/blob.bin": ("application/octet-stream", b"0123456789"),
        }
        for path, (kind, body) in expected.items():
            assert (await request(url + path))[:3] == (200, kind, body), path
        # Pretty URLs: the .html and /index.html forms redirect (307), query kept.
        for path, location in (
            ("/about.html?x=1", "/about?x=1"),
            ("/docs", "/docs/"),
            ("/docs/index.html", "/docs/"),
            ("/about/", "/about"),
        ):
            status, _, body, headers = await request(url + path)
            assert (status, headers["Location"], body) == (307, location, b""), path
        # Unmatched paths, and run_worker_first patterns, reach the worker.
        assert (await request(url + "/nothing"))[:3] == (
            404,
            "text/plain;charset=UTF-8",
            b"worker /nothing",
        )
        assert (await request(url + "/api/static.txt"))[:3] == (
            200,
            "application/json",
            b'{"api": "/api/static.txt"}',
        )
        # env.ASSETS.fetch from the worker.
        assert (await request(url + "/via-binding"))[:3] == (
            200,
            "text/html; charset=utf-8",
            b"<h1>about</h1>",
        )
        # Other methods go to the worker.
        assert (await request(url + "/about", "POST"))[2] == b"worker /about"
        status, kind, body, headers = await request(url + "/about", "HEAD")
        assert (status, kind, body, headers["Content-Length"]) == (
            200,
            "text/html; charset=utf-8",
            b"",
            "14",
        )


async def test_etag_304_and_ranges(tmp_path: Path) -> None:
    with DevServer(project(tmp_path)) as server:
        url = server.url + "/blob.bin"
        status, _, _, headers = await request(url)
        etag = headers["ETag"]
        assert status == 200 and etag.startswith('"') and etag.endswith('"')
        assert headers["Cache-Control"] == "public, max-age=0, must-revalidate"
        assert headers["Accept-Ranges"] == "bytes"
        status, _, body, again = await request(url, headers={"If-None-Match": etag})
        assert (status, body, again["ETag"]) == (304, b"", etag)
        assert (await request(url, headers={"If-None-Match": '"other"'}))[0] == 200
        for asked, expected_body, content_range in (
            ("bytes=2-5", b"2345", "bytes 2-5/10"),
            ("bytes=7-", b"789", "bytes 7-9/10"),
            ("bytes=-3", b"789", "bytes 7-9/10"),
            ("bytes=8-100", b"89", "bytes 8-9/10"),
        ):
            status, _, body, headers = await request(url, headers={"Range": asked})
            assert (status, body, headers["Content-Range"]) == (206, expected_body, content_range)
        status, _, body, headers = await request(url, headers={"Range": "bytes=10-"})
        assert (status, body, headers["Content-Range"]) == (416, b"", "bytes */10")
        # A changed file gets a new ETag.
        (server.project / "public" / "blob.bin").write_text("changed")
        status, _, body, headers = await request(url, headers={"If-None-Match": etag})
        assert (status, body) == (200, b"changed") and headers["ETag"] != etag


TRAVERSALS = [
    "/../secret.txt",
    "/%2e%2e/secret.txt",
    "/docs/%2E%2E/%2E%2E/secret.txt",
    "/..%2fsecret.txt",
    "/%2e%2e%5csecret.txt",
    "/docs/..%5c..%5csecret.txt",
    "/secret.txt%00.html",
    "/link/secret.txt",
    "//etc/passwd",
    "/public/../secret.txt",
]


async def test_traversal_never_leaves_the_directory(tmp_path: Path) -> None:
    root = project(tmp_path)
    (root / "public" / "link").symlink_to(root, target_is_directory=True)
    with DevServer(root) as server:
        host, port = server.url.removeprefix("http://").split(":")
        for path in TRAVERSALS:
            reader, writer = await asyncio.open_connection(host, int(port))
            # A raw request line: no client normalises the path first.
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = await reader.read()
            writer.close()
            await writer.wait_closed()
            assert b"outside the assets folder" not in answer, path
            assert b"root:" not in answer, path
            # The worker answers 404 for what no asset matched (or the gateway 400s it).
            assert answer.startswith((b"HTTP/1.1 404", b"HTTP/1.1 400")), (path, answer[:60])


async def test_not_found_handling(tmp_path: Path) -> None:
    spa = tmp_path / "spa"
    with DevServer(project(spa, not_found_handling="single-page-application")) as server:
        navigate = {"Sec-Fetch-Mode": "navigate"}
        assert (await request(server.url + "/some/route", headers=navigate))[:3] == (
            200,
            "text/html; charset=utf-8",
            b"<h1>home</h1>",
        )
        # Not a navigation (an API call, an image): the worker answers.
        assert (await request(server.url + "/some/route"))[2] == b"worker /some/route"
    pages = tmp_path / "pages"
    with DevServer(project(pages, not_found_handling="404-page")) as server:
        # From the worker, env.ASSETS.fetch applies not_found_handling: the nearest 404.html.
        status, kind, body, _ = await request(server.url + "/binding-missing")
        assert (status, kind, body) == (404, "text/html; charset=utf-8", b"site page not found")


async def test_missing_assets_directory_is_a_config_error(tmp_path: Path) -> None:
    root = cf_project(tmp_path, ASSETS_WORKER, {"assets": {"directory": "./nope"}})
    server = DevServer(root)
    with pytest.raises(AssertionError):
        server.start(timeout=30)
    assert server.stop() == 2
    assert 'assets.directory: folder "./nope" not found' in server.output.replace("\n", "")
