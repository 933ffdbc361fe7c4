"""Cloudflare's `workers`, `asgi`, `js` and `pyodide.ffi` modules, through a real `dockyard dev`."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.support.compat import cf_project, request
from tests.support.devserver import DevServer

TEXT = "text/plain;charset=UTF-8"

HELLO = """
from workers import Response, WorkerEntrypoint

class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return Response("Hello World!")
"""


async def test_hello_world_as_cloudflare_writes_it(tmp_path: Path) -> None:
    with DevServer(cf_project(tmp_path, HELLO)) as server:
        status, kind, body, _ = await request(server.url + "/")
        assert (status, kind, body) == (200, TEXT, b"Hello World!")


SHAPES = """
import json
from http import HTTPStatus

import asgi
from js import console
from pyodide.ffi import create_proxy, to_js
from workers import Request, Response, WorkerEntrypoint, fetch, handler, wsgi
import workers


async def asgi_app(scope, receive, send):
    message = await receive()
    body = json.dumps({
        "path": scope["path"], "query": scope["query_string"].decode(),
        "greeting": scope["env"].GREETING, "got": message["body"].decode(),
    }).encode()
    await send({"type": "http.response.start", "status": 201,
                "headers": [(b"content-type", b"application/json"), (b"x-app", b"asgi")]})
    await send({"type": "http.response.body", "body": body[:5], "more_body": True})
    await send({"type": "http.response.body", "body": body[5:]})


def wsgi_app(environ, start_response):
    text = "%s %s %s %s" % (environ["REQUEST_METHOD"], environ["PATH_INFO"],
                            environ["env"].GREETING, environ["wsgi.input"].read().decode())
    start_response("202 Accepted", [("Content-Type", "text/html; charset=utf-8")])
    return [text.encode()]


class Default(WorkerEntrypoint):
    @handler
    async def fetch(self, request):
        path = request.js_object.path
        console.log("serving", path)
        if path == "/json":
            return Response.json({"a": 1, "b": [True, None]})
        if path == "/json-status":
            return Response.json({"error": "nope"}, status=HTTPStatus.NOT_FOUND,
                                 headers={"x-extra": "1"})
        if path == "/redirect":
            return Response.redirect("https://example.com/next")
        if path == "/redirect-301":
            return Response.redirect("/moved", 301)
        if path == "/bytes":
            return Response(b"\\x00\\x01", status=203, status_text="Partial", headers={"x-a": "b"})
        if path == "/typed":
            return Response("<p>hi</p>", headers={"content-type": "text/html"})
        if path == "/empty":
            return Response(None, status=204)
        if path == "/bad-body":
            try:
                Response({"not": "allowed"})
            except TypeError as exc:
                return Response(str(exc), status=400)
        if path == "/request":
            made = Request("https://example.com/x", method="POST", body="payload",
                           headers={"x-h": "1"})
            return Response(json.dumps([made.method, made.url, made.headers["content-type"],
                                        await made.text(), made.js_object is made]))
        if path == "/echo-json":
            data = await request.json()
            return Response.json({"method": request.method, "data": data})
        if path.startswith("/asgi"):
            return await asgi.fetch(asgi_app, request.js_object, self.env)
        if path.startswith("/wsgi"):
            return await wsgi.fetch(wsgi_app, request, self.env)
        if path == "/ffi":
            converted = to_js({"k": [1, {"n": 2}]}, dict_converter=dict)
            proxy = create_proxy(lambda: "called")
            result = proxy()
            proxy.destroy()
            return Response(json.dumps([converted, result]))
        if path == "/env":
            return Response(workers.env.GREETING)
        return Response("fallthrough", status=404)
"""


async def test_response_request_and_adapters_match_cloudflare(tmp_path: Path) -> None:
    project = cf_project(tmp_path, SHAPES, {"vars": {"GREETING": "hej"}})
    with DevServer(project) as server:
        url = server.url
        assert (await request(url + "/json"))[:3] == (
            200,
            "application/json",
            b'{"a": 1, "b": [true, null]}',
        )
        status, kind, body, headers = await request(url + "/json-status")
        assert (status, kind, body, headers["x-extra"]) == (
            404,
            "application/json",
            b'{"error": "nope"}',
            "1",
        )
        status, kind, body, headers = await request(url + "/redirect")
        assert (status, kind, body) == (302, None, b"")
        assert headers["Location"] == "https://example.com/next"
        status, _, _, headers = await request(url + "/redirect-301")
        assert (status, headers["Location"]) == (301, "/moved")
        status, kind, body, headers = await request(url + "/bytes")
        assert (status, kind, body, headers["x-a"]) == (203, None, b"\x00\x01", "b")
        assert (await request(url + "/typed"))[:3] == (200, "text/html", b"<p>hi</p>")
        assert (await request(url + "/empty"))[:3] == (204, None, b"")
        assert (await request(url + "/bad-body"))[:3] == (
            400,
            TEXT,
            b"Unsupported type in Response: dict",
        )
        _, _, body, _ = await request(url + "/request")
        assert json.loads(body) == ["POST", "https://example.com/x", TEXT, "payload", True]
        status, kind, body, _ = await request(url + "/echo-json", "POST", json={"x": [1]})
        assert (status, kind, json.loads(body)) == (
            200,
            "application/json",
            {"method": "POST", "data": {"x": [1]}},
        )
        status, kind, body, headers = await request(url + "/asgi/p?q=1", "POST", data=b"up")
        assert (status, kind, headers["x-app"]) == (201, "application/json", "asgi")
        expected = {"path": "/asgi/p", "query": "q=1", "greeting": "hej", "got": "up"}
        assert json.loads(body) == expected
        assert (await request(url + "/wsgi/a%20b", "PUT", data=b"in"))[:3] == (
            202,
            "text/html; charset=utf-8",
            b"PUT /wsgi/a b hej in",
        )
        _, _, body, _ = await request(url + "/ffi")
        assert json.loads(body) == [{"k": [1, {"n": 2}]}, "called"]
        assert (await request(url + "/env"))[:3] == (200, TEXT, b"hej")
        server.wait_for("serving /ffi")


OLD_STYLE = """
from js import Response

def on_fetch(request):
    return Response.new("old style")
"""


async def test_old_style_on_fetch_with_js_response(tmp_path: Path) -> None:
    with DevServer(cf_project(tmp_path, OLD_STYLE)) as server:
        assert (await request(server.url + "/"))[:3] == (200, TEXT, b"old style")


NO_REQUEST = """
from workers import Response, WorkerEntrypoint
from js import JSON

class Default(WorkerEntrypoint):
    async def fetch(self):
        return Response(JSON.stringify({"no": "request"}))
"""


async def test_fetch_without_a_request_parameter(tmp_path: Path) -> None:
    with DevServer(cf_project(tmp_path, NO_REQUEST)) as server:
        assert (await request(server.url + "/"))[:3] == (200, TEXT, b'{"no":"request"}')


SHADOWED = """
import js
from workers import Response, WorkerEntrypoint

class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return Response(js.WHO)
"""


async def test_a_project_module_wins_over_the_runtime_module(tmp_path: Path) -> None:
    # The project ships its own `js.py`: Dockyard's stand-in must not shadow it.
    project = cf_project(tmp_path, SHADOWED, files={"src/js.py": "WHO = 'the project'\n"})
    with DevServer(project) as server:
        assert (await request(server.url + "/"))[:3] == (200, TEXT, b"the project")


FORMS = """
from workers import Blob, File, FormData, Response, WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        if request.path == "/echo-form":
            form = await request.form_data()
            upload = form["file"]
            return Response.json({
                "name": form["name"], "tags": form.get_all("tag"),
                "file": [upload.name, upload.content_type, await upload.text()],
            })
        if request.path == "/urlencoded":
            form = await request.formData()
            return Response.json(dict(form))
        if request.path == "/blob":
            return Response(Blob(["<b>", b"bold</b>"], "text/html"))
        form = FormData({"greeting": "hi"})
        form.append("doc", File(["data"], "a.txt", "text/plain"))
        return Response(form)
"""


async def test_form_data_blob_and_file(tmp_path: Path) -> None:
    with DevServer(cf_project(tmp_path, FORMS)) as server:
        form = aiohttp.FormData()
        form.add_field("name", "Ada")
        form.add_field("tag", "a")
        form.add_field("tag", "b")
        form.add_field("file", b"file body", filename="notes.txt", content_type="text/plain")
        status, kind, body, _ = await request(server.url + "/echo-form", "POST", data=form)
        assert (status, kind, json.loads(body)) == (
            200,
            "application/json",
            {"name": "Ada", "tags": ["a", "b"], "file": ["notes.txt", "text/plain", "file body"]},
        )
        status, _, body, _ = await request(
            server.url + "/urlencoded", "POST", data={"x": "1", "y": "two words"}
        )
        assert json.loads(body) == {"x": "1", "y": "two words"}
        assert (await request(server.url + "/blob"))[:3] == (200, "text/html", b"<b>bold</b>")
        status, kind, body, _ = await request(server.url + "/form")
        assert (
            status == 200 and kind is not None and kind.startswith("multipart/form-data; boundary=")
        )
        boundary = kind.split("boundary=")[1].encode()
        assert body == (
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="greeting"\r\n\r\nhi\r\n'
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="doc"; filename="a.txt"'
            b"\r\nContent-Type: text/plain\r\n\r\ndata\r\n--" + boundary + b"--\r\n"
        )
