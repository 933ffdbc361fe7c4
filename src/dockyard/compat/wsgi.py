"""``wsgi.fetch(app, request, env)``: serve one request with a WSGI app (Django, Flask).

The request body is read whole and the app runs in a worker thread, so a blocking view
never stalls the event loop; its response body is collected and returned. The worker's
env is ``environ["env"]`` (Dockyard's name; ASGI apps get ``scope["env"]``).
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from yarl import URL

from dockyard.http import Request, Response

__all__ = ["environ_for", "fetch"]

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def environ_for(request: Request, body: bytes, env: Any) -> dict[str, Any]:
    url = URL(request.url)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        # PEP 3333: the path is the URL-decoded bytes, carried in a latin-1 str.
        "PATH_INFO": unquote_to_bytes(url.raw_path).decode("latin-1"),
        "QUERY_STRING": url.raw_query_string,
        "SERVER_NAME": url.host or "localhost",
        "SERVER_PORT": str(url.port or (443 if url.scheme == "https" else 80)),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": url.scheme or "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "env": env,
    }
    for name, value in request.headers.items():
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = value
            continue
        key = f"HTTP_{key}"
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    if body and "CONTENT_LENGTH" not in environ:
        environ["CONTENT_LENGTH"] = str(len(body))
    return environ


def _call(app: WsgiApp, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    outcome: dict[str, Any] = {}
    written: list[bytes] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None and outcome:
            raise exc_info[1].with_traceback(exc_info[2])
        outcome["status"] = int(status.split(" ", 1)[0])
        outcome["headers"] = list(headers)
        return written.append

    result = app(environ, start_response)
    try:
        for chunk in result:
            written.append(bytes(chunk))
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if "status" not in outcome:
        raise RuntimeError("The WSGI application did not call start_response()")
    return outcome["status"], outcome["headers"], b"".join(written)


async def fetch(app: WsgiApp, request: Request, env: Any, ctx: Any = None) -> Response:
    body = await request.bytes() if request.has_body else b""
    environ = environ_for(request, body, env)
    status, headers, payload = await asyncio.to_thread(_call, app, environ)
    return Response(payload, status=status, headers=headers)
