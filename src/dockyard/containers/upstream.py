"""A lean HTTP/1.1 client for the last hop: Dockyard to a container port on 127.0.0.1.

The general-purpose aiohttp client spends about twice as long per request as this one
(measured: 53 µs against 24 µs per keep-alive GET on this path), and the last hop is on
every proxied request. It does only what that hop needs: keep-alive connections pooled
per port, request bodies as bytes or streams (chunked when their length is unknown),
response bodies buffered or streamed with flow control both ways, HEAD requests.
WebSocket upgrades stay with aiohttp (see proxy.py).

A port is reached either at its published ``127.0.0.1:<host port>``, or, when the runtime
can make connections inside containers (root beside a local engine, or a node that is,
see `NamespaceConnections`), as ``InNamespace``: on the container's own loopback, through
a socket made inside its namespace (netns.py), which keeps the engine's userland proxy off
the path. A namespace connection that fails falls back to the published port, and that
target is then reached there only.

Header names and values are latin-1 str both ways (one character per byte, as the
gateway holds them): bytes pass through unchanged. A header that would corrupt the
request (a line break, a NUL, a bad name) raises ``InvalidHeader`` and is never sent.

Over 400 lines: one connection's protocol, its response and the pool that hands
connections out share their state closely (a response returns its connection to the
pool); the head's serialization is the only piece that stands alone, and it is short.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import httptools

from .._flow import BATCHED_MAX, ChunkBuffer, SendBatch, WriteFlow, send_batch
from ..errors import ContainerError, InvalidHeader
from ..http import GOOD_HEADER_NAMES, check_header_name, encode_header_block

__all__ = [
    "ConnectInside",
    "InNamespace",
    "Target",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
]

log = logging.getLogger("dockyard.containers")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

CONNECT_TIMEOUT = 5.0
MAX_IDLE_PER_PORT = 64


class UpstreamError(ConnectionError):
    """The connection to the container failed or broke before the response was complete."""


@dataclass(frozen=True, slots=True)
class InNamespace:
    """Container port ``port`` on the loopback of container ``container_id`` (main
    process ``pid`` where the runtime reported one), published on the host as
    ``host_port`` (the fallback)."""

    container_id: str
    pid: int | None
    port: int
    host_port: int


# A published host port on 127.0.0.1, or a port inside a container's namespace.
Target = int | InNamespace

# NamespaceConnections.connect_in_container: (container id, port, pid=...) -> a socket
# connected inside the container.
ConnectInside = Callable[..., Awaitable[socket.socket]]


class _Connection(WriteFlow, asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, target: Target) -> None:
        self.pool = pool
        self.target = target
        # Made inside the pool's connect: kept, as asyncio.get_running_loop() costs a
        # getpid system call on each use (CPython's check for a fork).
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self._response: UpstreamResponse | None = None
        self._headers_ready: asyncio.Future[None] | None = None
        self._header_list: list[tuple[str, str]] = []
        self._informational = False
        # Set while a HEAD request is out: its answer has a head and no body.
        self.head_request = False
        # A request written in this pass of the loop, sent at its end (SendBatch).
        self.unsent = b""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the container sent a malformed HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        self._release_writer()
        response = self._response
        if response is not None and response._until_close and not response.body.complete:
            # No length and not chunked: the body ends where the connection does.
            response.body.finish()
            return
        self._fail(UpstreamError(f"the container closed the connection ({exc or 'EOF'})"))

    def send_unsent(self) -> None:
        """Write the request kept for the end of the pass (SendBatch calls it), unless
        its caller was cancelled meanwhile: then the container never sees it."""
        data, self.unsent = self.unsent, b""
        ready = self._headers_ready
        if ready is not None and ready.cancelled():
            return
        transport = self.transport
        if data and not self.closed and transport is not None and not transport.is_closing():
            transport.write(data)

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_list.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True  # 100 Continue and friends: the real answer follows
            self._header_list = []
            return
        response = self._response
        if response is None:
            return
        response.status = status
        # Asked here: llhttp answers this reliably only while the message is current.
        response._keep_alive = self.parser.should_keep_alive()
        response.headers = self._header_list
        self._header_list = []
        response._note_framing()
        if self.head_request:
            # The parser would wait for the body its Content-Length announces; there is
            # none. The answer ends here, and the next one gets a fresh parser.
            response._until_close = False
            response.body.finish()
            self.parser = httptools.HttpResponseParser(self)
        if self._headers_ready is not None and not self._headers_ready.done():
            self._headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self.head_request:
            self._response.body.feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._response is not None and not self.head_request:
            self._response.body.finish()

    # used by the pool and responses

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: UpstreamError) -> None:
        if self._headers_ready is not None and not self._headers_ready.done():
            self._headers_ready.set_exception(error)
        if self._response is not None:
            self._response.body.finish(error)

    def _done(self, response: UpstreamResponse) -> None:
        """The response was released: keep the connection for the next request, or not."""
        self._response = None
        body = response.body
        reusable = body.complete and body.error is None and response._keep_alive
        if reusable and not self.closed:
            self.pool._keep(self)
        else:
            self.close()


class UpstreamResponse:
    """Status and headers of a container's response; the body is read or iterated once."""

    def __init__(self, connection: _Connection) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self._connection = connection
        transport = connection.transport
        assert transport is not None
        self.body = ChunkBuffer(transport.pause_reading, transport.resume_reading)
        self._released = False
        self._until_close = False
        self._keep_alive = False

    def _note_framing(self) -> None:
        chunked = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == "content-length" and value.strip().isdigit():
                self.content_length = int(value)
            elif lower == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        self._until_close = (
            self.content_length is None
            and not chunked
            and self.status
            not in (
                204,
                304,
            )
        )

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end."""
        return await self.body.next_chunk()

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool."""
        try:
            whole = self.body.take_all()  # usually all there with the head: no awaits
            if whole is not None:
                return whole
            parts = []
            while (chunk := await self.next_chunk()) is not None:
                parts.append(chunk)
            return b"".join(parts)
        finally:
            self.release()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            while (chunk := await self.next_chunk()) is not None:
                yield chunk
        finally:
            self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._connection._done(self)


BodySource = bytes | AsyncIterable[bytes] | None


class UpstreamPool:
    """Keep-alive connections to container ports on 127.0.0.1, reused across requests.

    ``connect_inside`` makes the connections to ``InNamespace`` targets; without it they
    go to the published port."""

    def __init__(
        self,
        *,
        max_idle_per_port: int = MAX_IDLE_PER_PORT,
        connect_inside: ConnectInside | None = None,
    ) -> None:
        self.max_idle_per_port = max_idle_per_port
        self._connector = connect_inside
        self._idle: dict[Target, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        # Namespace targets whose connection failed: reached at their host port since.
        self._published_only: set[InNamespace] = set()
        self._batch: SendBatch | None = None
        # Exchanges waiting for their answer: alone, a request has nothing to share a
        # batch with, and keeping it for the end of the pass only delays it.
        self._exchanging = 0

    async def request(
        self,
        target: Target,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: BodySource = None,
    ) -> UpstreamResponse:
        """Send one request; returns once the response headers arrived.

        A request that can be sent again (no body, or a bytes body) is retried once on a
        new connection when a reused one turns out to have been closed by the container.
        """
        head, body_framing = _serialize_head(method, path, headers, body)
        connection = self._idle_connection(target)
        replayable = body is None or isinstance(body, bytes)  # (no slow ABC check)
        for attempt in (1, 2):
            if connection is None:
                connection = await self._connect(target)
            try:
                return await self._exchange(connection, head, body, body_framing)
            except UpstreamError:
                if attempt == 2 or not (connection.reused and replayable):
                    raise
                connection = None
        raise AssertionError("unreachable")

    def close(self) -> None:
        for connection in list(self._all):
            connection.close()
        self._idle.clear()

    @property
    def open_connections(self) -> int:
        return len(self._all)

    async def _connect(self, target: Target) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                sock = None
                if isinstance(target, InNamespace) and target not in self._published_only:
                    sock = await self._connect_inside(target)
                if sock is not None:
                    transport, connection = await _adopt(
                        loop, sock, lambda: _Connection(self, target)
                    )
                else:
                    port = target.host_port if isinstance(target, InNamespace) else target
                    transport, connection = await loop.create_connection(
                        lambda: _Connection(self, target), "127.0.0.1", port
                    )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {_describe(target)}: {exc}") from exc
        # uvloop may call connection_made only after create_connection has returned.
        connection.transport = transport
        # Requests are small single writes answered at once: Nagle's algorithm would
        # hold them back waiting for an ACK that delayed-ACK holds back in turn.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._all.add(connection)
        return connection

    async def _connect_inside(self, target: InNamespace) -> socket.socket | None:
        """A socket connected inside the container's namespace, or None (no connector, or
        it failed: the target is then reached at its published port)."""
        if self._connector is None:
            return None
        try:
            return await self._connector(target.container_id, target.port, pid=target.pid)
        except (OSError, ContainerError) as exc:
            # A server listening on the container's external address only, a container
            # that is being replaced, or no right to enter: the published port still works.
            log.debug(
                "Container %s port %d: reached at its published port (%s)",
                target.container_id[:12],
                target.port,
                exc,
            )
            if len(self._published_only) < 4096:
                self._published_only.add(target)
            return None

    async def _exchange(
        self, connection: _Connection, head: bytes, body: BodySource, chunked: bool
    ) -> UpstreamResponse:
        transport = connection.transport
        assert transport is not None
        response = UpstreamResponse(connection)
        connection._response = response
        connection.head_request = head.startswith(b"HEAD ")
        ready = connection._headers_ready = connection.loop.create_future()
        self._exchanging += 1
        try:
            if body is None or isinstance(body, bytes):
                data = head + body if body else head
                if len(data) > BATCHED_MAX or self._exchanging == 1:
                    transport.write(data)
                else:
                    # Sent at the end of this pass of the loop, with the others made in it.
                    connection.unsent = data
                    self._send_batch(connection.loop).add(connection)
            else:
                transport.write(head)
                await connection.send_body(
                    transport, body, chunked=chunked, closed=lambda: connection.closed
                )
            await ready
        except BaseException:
            connection._response = None
            # Nobody waits for this answer any more: its failure must not be reported
            # as an exception never retrieved when the connection closes.
            ready.cancel()
            connection.close()
            raise
        finally:
            self._exchanging -= 1
        return response

    def _send_batch(self, loop: asyncio.AbstractEventLoop) -> SendBatch:
        # (kept: looked up once, not per request)
        if self._batch is None:
            self._batch = send_batch(loop)
        return self._batch

    def _idle_connection(self, target: Target) -> _Connection | None:
        idle = self._idle.get(target)
        while idle:
            connection = idle.pop()
            if not connection.closed:
                connection.reused = True
                return connection
        return None

    def _keep(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.target, [])
        if len(idle) < self.max_idle_per_port:
            idle.append(connection)
        else:
            connection.close()

    def _forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        idle = self._idle.get(connection.target)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                # Targets come and go with container runs: no key outlives its connections.
                del self._idle[connection.target]


async def _adopt(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: Callable[[], _Connection]
) -> tuple[asyncio.Transport, _Connection]:
    """``create_connection(sock=sock)``, finished even if the caller is cancelled (and the
    transport then closed). Cancelled midway, uvloop closes the descriptor it took over
    but leaves ``sock`` thinking it still owns it: closing that later would close
    whatever file reuses the number."""
    adopting: asyncio.Future[tuple[asyncio.Transport, _Connection]]
    adopting = asyncio.ensure_future(loop.create_connection(factory, sock=sock))
    try:
        return await asyncio.shield(adopting)
    except asyncio.CancelledError:
        adopting.add_done_callback(_close_adopted)
        raise


def _close_adopted(adopting: asyncio.Future[tuple[asyncio.Transport, _Connection]]) -> None:
    if not adopting.cancelled() and adopting.exception() is None:
        adopting.result()[0].close()


def _describe(target: Target) -> str:
    if isinstance(target, InNamespace):
        return f"port {target.port} of container {target.container_id[:12]}"
    return f"127.0.0.1:{target}"


def _serialize_head(
    method: str, target: str, headers: list[tuple[str, str]], body: BodySource
) -> tuple[bytes, bool]:
    """The request line and headers, with framing for the body; True if chunked."""
    lines = []
    has_length = has_host = False
    good_names = GOOD_HEADER_NAMES
    for name, value in headers:
        if name not in good_names:
            check_header_name(name)  # raises InvalidHeader, or remembers the name
        lower = name.lower()
        has_host = has_host or lower == "host"
        if lower == "content-length":
            if isinstance(body, bytes) or body is None:
                continue  # set below from the body itself
            has_length = True
        lines.append(f"{name}: {value}\r\n")
    if not has_host:
        lines.append("Host: container\r\n")  # HTTP/1.1 requires one
    chunked = False
    if isinstance(body, bytes):
        lines.append(f"Content-Length: {len(body)}\r\n")
    elif body is None:
        if method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0\r\n")
    elif not has_length:
        lines.append("Transfer-Encoding: chunked\r\n")
        chunked = True
    if method not in _METHODS and _TOKEN.fullmatch(method) is None:
        raise InvalidHeader(f"invalid method {method[:20]!r}")
    if " " in target or not target.isprintable():
        raise InvalidHeader(f"invalid request target {target[:200]!r}")
    try:
        line = f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
    except UnicodeEncodeError as exc:
        raise InvalidHeader(f"invalid request target {target[:200]!r}") from exc
    return line + encode_header_block("".join(lines), len(lines)) + b"\r\n", chunked
