"""The gateway: an aiohttp server that turns HTTP and WebSocket traffic into fetch calls.

Bodies are streamed both ways; nothing here holds a whole request or response body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import WSMsgType, web

from .._tasks import until_first_done
from ..errors import DockyardError
from ..http import STREAM_CHUNK, Request, Response, WebSocket

__all__ = ["Dispatch", "Gateway"]

log = logging.getLogger("dockyard.gateway")
access_log = logging.getLogger("dockyard.access")

Dispatch = Callable[[Request], Awaitable[Response]]

# Managed by aiohttp itself on the way out; copying the worker's values would corrupt framing.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection", "te"}
)


class Gateway:
    """Serves ``dispatch`` on ``host:port``; ``start()`` returns the bound port."""

    def __init__(self, dispatch: Dispatch, *, host: str = "127.0.0.1", port: int = 8787) -> None:
        self.dispatch = dispatch
        self.host = host
        self.port = port
        self._runner: web.ServerRunner | None = None

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> int:
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, raw: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        request = Request(
            str(raw.url),
            method=raw.method,
            headers=raw.headers,
            body=_request_body(raw) if raw.body_exists else None,
        )
        try:
            response = await self.dispatch(request)
        except DockyardError as exc:
            log.warning("%s %s -> %s: %s", raw.method, raw.path, exc.status, exc)
            response = Response(f"{exc}\n", status=exc.status)
        except Exception:
            # The traceback is for the console; clients get no internals.
            log.exception("Uncaught exception in worker for %s %s", raw.method, raw.path_qs)
            response = Response("Internal Server Error\n", status=500)
        if response.web_socket is not None:
            result = await self._bridge_websocket(raw, response.web_socket)
        else:
            result = await _send(raw, response)
        access_log.info(
            "%s %s %s (%.1f ms)",
            raw.method,
            raw.path_qs,
            result.status,
            (time.perf_counter() - started) * 1000,
        )
        return result

    async def _bridge_websocket(self, raw: web.BaseRequest, end: WebSocket) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(raw)

        async def client_to_worker() -> None:
            async for message in ws:
                if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await end.send(message.data)
            await end.close(_close_code(ws.close_code), "")

        async def worker_to_client() -> None:
            while True:
                message = await end.receive()
                if message.type == "close":
                    await ws.close(code=_close_code(message.code), message=message.reason.encode())
                    return
                if isinstance(message.data, str):
                    await ws.send_str(message.data)
                elif message.data is not None:
                    await ws.send_bytes(message.data)

        # Whichever side ends first ends the bridge; the other side is told and closed.
        try:
            await until_first_done(client_to_worker(), worker_to_client())
        finally:
            await end.close(1001, "client went away")
            if not ws.closed:
                await ws.close()
        return ws


def _close_code(code: int | None) -> int:
    # 1005 and 1006 are reserved for "no status" and "abnormal"; they must not be sent.
    return 1000 if code in (None, 1005, 1006) else code


async def _request_body(raw: web.BaseRequest) -> AsyncIterator[bytes]:
    async for chunk in raw.content.iter_chunked(STREAM_CHUNK):
        yield chunk


async def _send(raw: web.BaseRequest, response: Response) -> web.StreamResponse:
    headers = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP]
    length = response.body_length
    if length is not None:
        body = await response.bytes() if length else None
        out = web.Response(status=response.status, body=body)
        for key, value in headers:
            if key.lower() != "content-length":
                out.headers.add(key, value)
        return out
    stream = web.StreamResponse(status=response.status)
    for key, value in headers:
        stream.headers.add(key, value)
    await stream.prepare(raw)
    async for chunk in response.stream():
        await stream.write(chunk)
    await stream.write_eof()
    return stream
