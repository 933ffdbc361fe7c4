"""The gateway: the server that turns HTTP and WebSocket traffic into fetch calls.

Plain HTTP/1.1 is served by ``HttpProtocol`` (protocol.py); a WebSocket upgrade is
handed with its connection to aiohttp's server, which speaks the WebSocket protocol and
calls ``_handle_upgrade`` here. Bodies are streamed both ways; nothing here holds a
whole request or response body.

The gateway listens on TCP (``host``/``port``) or on a unix socket (``path``), and also
serves connections accepted elsewhere: ``serve_accepted(sock, initial)`` takes a socket
another process accepted and the bytes it already read from it (the node's router hands
connections to an app process this way; see ``handoff.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import WSMsgType, web

from .._flow import SendBatch, send_batch
from .._tasks import until_first_done
from ..errors import DockyardError, error_id
from ..http import HOP_BY_HOP, STREAM_CHUNK, Request, Response, WebSocket, error_response
from .access import AccessLog
from .connections import Connections
from .limits import GatewayLimits
from .protocol import HttpProtocol, Respond, Upgrade

__all__ = ["AccessLog", "Dispatch", "Gateway", "GatewayLimits"]

log = logging.getLogger("dockyard.gateway")

Dispatch = Callable[[Request], Awaitable[Response]]


class Gateway:
    """Serves ``dispatch`` on ``host:port``, or on the unix socket ``path`` when given;
    ``start()`` returns the bound port (0 on a unix socket). With ``access_log``, each
    answer is written there (``dockyard dev``'s line per request)."""

    def __init__(
        self,
        dispatch: Dispatch,
        *,
        host: str = "127.0.0.1",
        port: int = 8787,
        limits: GatewayLimits | None = None,
        path: str | Path | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.dispatch = dispatch
        self.access_log = access_log
        self.limits = limits or GatewayLimits()
        self.host = host
        self.port = port
        self.path = Path(path) if path is not None else None
        self._server: asyncio.Server | None = None
        self._connections: Connections[HttpProtocol] = Connections(self.limits.max_connections)
        self._upgrades = web.Server(self._handle_upgrade, access_log=None)
        # The head of each upgrade as the gateway parsed it (latin-1, byte-exact), for
        # the request the WebSocket server hands back.
        self._upgrade_heads: dict[asyncio.BaseTransport, list[tuple[str, str]]] = {}

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._connections.stopping = False
        if self.path is not None:
            _remove_stale_socket(self.path)
            self._server = await loop.create_unix_server(
                self.protocol,
                str(self.path),
                backlog=self.limits.backlog,
            )
            return 0
        self._server = await loop.create_server(
            self.protocol,
            self.host,
            self.port,
            reuse_address=True,
            backlog=self.limits.backlog,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def protocol(self) -> HttpProtocol:
        """The protocol for one new connection, as the server makes it per accepted socket
        (bench/scenarios/layers.py feeds one through a transport of its own)."""
        return HttpProtocol(
            self.respond,
            self._upgrade,
            self._connections,
            self.limits,
            send_batch(asyncio.get_running_loop()),
        )

    async def serve_accepted(self, sock: socket.socket, initial: bytes = b"") -> None:
        """Serve a connection accepted elsewhere, as if this gateway had accepted it.

        ``initial`` holds the bytes already read from ``sock``: they are parsed before
        anything read from the socket. The gateway owns ``sock`` from the call on (it is
        closed here if it cannot be served).
        """
        if self._server is None or self._connections.stopping:
            sock.close()
            return
        loop = asyncio.get_running_loop()
        try:
            sock.setblocking(False)
            await loop.connect_accepted_socket(
                lambda: _HandedOver(
                    self.respond,
                    self._upgrade,
                    self._connections,
                    self.limits,
                    send_batch(asyncio.get_running_loop()),
                    initial,
                ),
                sock,
            )
        except BaseException:
            sock.close()  # (a no-op if the transport already owns and closed it)
            raise

    async def stop(self) -> None:
        """Stop accepting, let answers in flight finish (``stop_grace``), then end the rest.

        Every connection task is done (finished or cancelled and awaited) on return.
        """
        if self._server is None:
            return
        self._server.close()
        self._connections.stopping = True
        for connection in self._connections:
            if connection.idle:
                connection.close()
        busy = [c.in_flight for c in self._connections if c.in_flight is not None]
        if busy:
            await asyncio.wait(busy, timeout=self.limits.stop_grace)
        for connection in self._connections:
            connection.close()
        late = [c.in_flight for c in self._connections if c.in_flight is not None]
        late.extend(task for task in busy if not task.done())
        for task in late:
            task.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)
        await self._upgrades.shutdown(1.0)
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        self._server = None
        if self.path is not None:
            # (asyncio before 3.13 leaves the socket file behind)
            _remove_stale_socket(self.path)

    async def respond(self, request: Request) -> Response:
        """Run the worker for one request; errors become responses here, never escape."""
        started = time.perf_counter()
        try:
            response = await self.dispatch(request)
        except DockyardError as exc:
            ident = error_id()
            log.warning(
                "%s %s -> %s (error id %s): %s", request.method, request.url, exc.status, ident, exc
            )
            response = error_response(exc, ident)
        except Exception:
            # The traceback is for the console; clients get no internals.
            ident = error_id()
            log.exception(
                "Uncaught exception in worker for %s %s (error id %s)",
                request.method,
                request.url,
                ident,
            )
            response = Response(f"Internal Server Error (error id {ident})\n", status=500)
        if self.access_log is not None:
            self.access_log.answered(request, response.status, time.perf_counter() - started)
        return response

    def _upgrade(
        self, transport: asyncio.Transport, raw: bytes, headers: list[tuple[str, str]]
    ) -> None:
        handler = self._upgrades()
        for gone in [t for t in self._upgrade_heads if t.is_closing()]:
            del self._upgrade_heads[gone]
        self._upgrade_heads[transport] = headers
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(raw)

    async def _handle_upgrade(self, raw: web.BaseRequest) -> web.StreamResponse:
        parsed = self._upgrade_heads.pop(raw.transport, None) if raw.transport else None
        request = Request(
            str(raw.url),
            method=raw.method,
            headers=parsed if parsed is not None else raw.headers,
            body=_request_body(raw) if raw.body_exists else None,
        )
        response = await self.respond(request)
        if response.web_socket is not None:
            return await self._bridge_websocket(raw, response.web_socket)
        return await _send(raw, response)

    async def _bridge_websocket(self, raw: web.BaseRequest, end: WebSocket) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=self.limits.websocket_max_message)
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


class _HandedOver(HttpProtocol):
    """A connection accepted by another process, with the bytes it had already read.

    They are fed from ``connection_made``, which the event loop calls before any read
    from the socket: so they are parsed first, whatever the loop does meanwhile.
    """

    def __init__(
        self,
        respond: Respond,
        upgrade: Upgrade,
        connections: Connections[HttpProtocol],
        limits: GatewayLimits,
        batch: SendBatch,
        initial: bytes,
    ) -> None:
        super().__init__(respond, upgrade, connections, limits, batch)
        self._initial = initial

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        initial, self._initial = self._initial, b""
        if initial and not transport.is_closing():
            self.data_received(initial)


def _remove_stale_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


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
