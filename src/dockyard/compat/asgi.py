"""``asgi.fetch(app, request, env)``: serve one request with an ASGI app (FastAPI, Starlette).

The app sees ``scope["env"]`` (the worker's env), as with Cloudflare's adapter. The
response streams: headers go out when the app sends ``http.response.start`` and each body
chunk as it is sent, with back pressure (the app waits while the client is slow). The app
runs as a task owned by the response body: it is cancelled if the client goes away.

Differences from Cloudflare: no lifespan events are sent (Cloudflare runs startup
before every request); WebSocket scopes are not served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from yarl import URL

from dockyard.http import Request, Response

__all__ = ["fetch"]

log = logging.getLogger("dockyard.asgi")
ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
# Body chunks the app may send ahead of the client before its send() waits.
QUEUE_CHUNKS = 8


def scope_for(request: Request, env: Any) -> dict[str, Any]:
    url = URL(request.url)
    port = url.port or (443 if url.scheme == "https" else 80)
    return {
        "type": "http",
        "asgi": ASGI_VERSION,
        "http_version": "1.1",
        "method": request.method,
        "scheme": url.scheme or "http",
        "path": url.path,
        "raw_path": url.raw_path.encode(),
        "query_string": url.raw_query_string.encode(),
        "root_path": "",
        "headers": [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()
        ],
        "client": None,
        "server": (url.host or "localhost", port),
        "state": {},
        "env": env,
    }


class _AppBody:
    """The response body: chunks the app sends, and the owner of the app's task."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_CHUNKS)
        self.task: asyncio.Task[None] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.queue.get()
            if chunk is None:
                return
            yield chunk

    async def aclose(self) -> None:
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def fetch(app: Any, request: Request, env: Any, ctx: Any = None) -> Response:
    """Run ``app`` for ``request``; return once the app has sent its status and headers."""
    body = _AppBody()
    started: asyncio.Future[tuple[int, list[tuple[str, str]]]] = (
        asyncio.get_running_loop().create_future()
    )
    finished = asyncio.Event()
    incoming = request.stream() if request.has_body else None
    request_ended = False

    async def receive() -> dict[str, Any]:
        nonlocal request_ended
        if incoming is not None and not request_ended:
            try:
                chunk = await incoming.__anext__()
            except StopAsyncIteration:
                pass
            else:
                return {"type": "http.request", "body": chunk, "more_body": True}
        if not request_ended:
            request_ended = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            started.set_result((int(message["status"]), headers))
        elif kind == "http.response.body":
            if not started.done():
                raise RuntimeError("ASGI app sent a body before http.response.start")
            chunk = bytes(message.get("body", b""))
            if chunk:
                await body.queue.put(chunk)
            if not message.get("more_body", False):
                finished.set()
                await body.queue.put(None)

    async def run() -> None:
        try:
            await app(scope_for(request, env), receive, send)
            if not started.done():
                raise RuntimeError("The ASGI application did not send a response")
            if not finished.is_set():
                finished.set()
                await body.queue.put(None)
        except Exception as error:
            if not started.done():
                started.set_exception(error)
            else:
                log.exception("ASGI app failed after its response started")
                finished.set()
                await body.queue.put(None)

    body.task = asyncio.get_running_loop().create_task(run())
    try:
        status, headers = await started
    except BaseException:
        await body.aclose()
        raise
    return Response(body, status=status, headers=headers)
