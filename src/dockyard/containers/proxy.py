"""Forwarding HTTP requests and WebSockets to a container's port on 127.0.0.1.

Bodies are streamed both ways. Each forward reports activity through callbacks so the
owning Container can keep its in-flight count and its sleep timer right.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from .._tasks import until_first_done
from ..errors import ContainerGone
from ..http import HOP_BY_HOP, Request, Response, WebSocketPair, parsed_url
from .upstream import Target, UpstreamError, UpstreamPool, UpstreamResponse

__all__ = ["CONTAINER_BASE_URL", "forward_http", "forward_websocket", "open_session"]

# Relative URLs given to container_fetch resolve here, so the container sees Host: container.
CONTAINER_BASE_URL = "http://container"

# Responses up to this size (with a Content-Length) are buffered rather than streamed.
SMALL_BODY = 64 * 1024
WEBSOCKET_HANDSHAKE = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"}
)


def open_session() -> aiohttp.ClientSession:
    """One pooled session per node for every container connection (keep-alive upstream)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=None),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
    )


def target_url(request_url: str, host_port: int) -> URL:
    url = URL(request_url)
    if not url.is_absolute():
        url = URL(CONTAINER_BASE_URL).join(url)
    return URL.build(
        scheme="http",
        host="127.0.0.1",
        port=host_port,
        path=url.raw_path or "/",
        query_string=url.raw_query_string,
        encoded=True,
    )


def host_header(request_url: str | URL) -> str:
    url = request_url if isinstance(request_url, URL) else URL(request_url)
    if not url.is_absolute():
        return URL(CONTAINER_BASE_URL).host or "container"
    return url.raw_authority or "container"


def _forward_headers(request: Request, *, websocket: bool = False) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for key, value in request.headers.items():
        lower = key.lower()
        if lower in HOP_BY_HOP or (websocket and lower in WEBSOCKET_HANDSHAKE):
            continue
        headers.add(key, value)
    headers.setdefault("Host", host_header(request.url))
    return headers


async def forward_http(
    pool: UpstreamPool,
    target: Target,
    request: Request,
    *,
    on_finished: Callable[[], None],
    on_lost: Callable[[BaseException], ContainerGone],
) -> Response:
    """Send ``request`` to the container; ``on_finished`` runs once the body is done.

    ``on_lost`` turns a connection failure into the error to raise (it knows whether
    the container is still there).
    """
    url = parsed_url(request)
    path = url.raw_path_qs if url.is_absolute() else URL(CONTAINER_BASE_URL).join(url).raw_path_qs
    body: bytes | AsyncIterator[bytes] | None = None
    if request.has_body:
        body = await request.bytes() if request.body_length is not None else request.stream()
    try:
        upstream = await pool.request(
            target, request.method, path or "/", _header_list(request, url), body
        )
    except UpstreamError as exc:
        on_finished()
        raise on_lost(exc) from exc
    length = upstream.content_length
    if upstream.status in (204, 304) or length == 0:
        upstream.release()
        on_finished()
        return _response(None, upstream)
    if length is not None and length <= SMALL_BODY:
        # Small bodies are read at once: one write downstream instead of a stream.
        try:
            data = await upstream.read()
        except UpstreamError as exc:
            raise on_lost(exc) from exc
        finally:
            on_finished()
        return _response(data, upstream)
    return _response(_Relay(upstream, on_finished, on_lost), upstream)


def _response(body: bytes | _Relay | None, upstream: UpstreamResponse) -> Response:
    response = Response(body, status=upstream.status)
    # The container's headers are already str pairs: one copy into the response, without
    # the per-item conversion the constructor does for arbitrary header input.
    response.headers = CIMultiDict(
        [(k, v) for k, v in upstream.headers if k.lower() not in HOP_BY_HOP]
    )
    return response


def _header_list(request: Request, url: URL) -> list[tuple[str, str]]:
    headers = []
    has_host = False
    for k, v in request.headers.items():
        lower = k.lower()
        if lower not in HOP_BY_HOP:
            headers.append((k, v))
            has_host = has_host or lower == "host"
    if not has_host:
        headers.append(("Host", host_header(url)))
    return headers


class _Relay:
    """A container's response body on its way to the client.

    A class rather than a generator so that closing it before the first chunk still
    releases the upstream connection and ends the request's activity.
    """

    __slots__ = ("_done", "_on_finished", "_on_lost", "_upstream")

    def __init__(
        self,
        upstream: UpstreamResponse,
        on_finished: Callable[[], None],
        on_lost: Callable[[BaseException], ContainerGone],
    ) -> None:
        self._upstream = upstream
        self._on_finished = on_finished
        self._on_lost = on_lost
        self._done = False

    def __aiter__(self) -> _Relay:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._upstream.next_chunk()
        except UpstreamError as exc:
            self._finish()
            raise self._on_lost(exc) from exc
        if chunk is None:
            self._finish()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self._finish()

    def __del__(self) -> None:
        # A body nobody read to the end nor closed (a worker that dropped the response)
        # must still end the request's hold on the container.
        if not self._done:
            with contextlib.suppress(Exception):
                self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._upstream.release()
            self._on_finished()


async def forward_websocket(
    session: aiohttp.ClientSession,
    host_port: int,
    request: Request,
    *,
    on_message: Callable[[], None],
    on_finished: Callable[[], None],
    on_lost: Callable[[BaseException], ContainerGone],
    own: Callable[[asyncio.Task[Any]], None],
) -> Response:
    """Open a WebSocket to the container and hand the client end back as a 101."""
    protocols = [
        p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",") if p.strip()
    ]
    headers = _forward_headers(request, websocket=True)
    headers.popall("sec-websocket-protocol", None)
    try:
        upstream = await session.ws_connect(
            target_url(request.url, host_port),
            headers=headers,
            protocols=protocols,
            autoping=True,
            max_msg_size=0,
        )
    except aiohttp.WSServerHandshakeError as exc:
        on_finished()
        return Response(f"Container refused the WebSocket upgrade: {exc.message}\n", status=502)
    except (TimeoutError, aiohttp.ClientConnectionError) as exc:
        on_finished()
        raise on_lost(exc) from exc
    client, server = WebSocketPair()
    server.accept()

    async def container_to_client() -> None:
        async for message in upstream:
            on_message()
            if message.type == aiohttp.WSMsgType.TEXT:
                await server.send(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await server.send(message.data)
            else:
                break
        await server.close(upstream.close_code or 1000, "")

    async def client_to_container() -> None:
        async for data in server:
            on_message()
            if isinstance(data, str):
                await upstream.send_str(data)
            else:
                await upstream.send_bytes(data)
        await upstream.close(code=server.close_code or 1000)

    async def bridge() -> None:
        try:
            await until_first_done(container_to_client(), client_to_container())
        finally:
            if not upstream.closed:
                await upstream.close()
            await server.close(1000, "")
            on_finished()

    own(asyncio.create_task(bridge()))
    response_headers = {}
    if upstream.protocol:
        response_headers["sec-websocket-protocol"] = upstream.protocol
    return Response(None, status=101, headers=response_headers, web_socket=client)
