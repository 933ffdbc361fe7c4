"""The node's application listener: each client connection goes to the app its Host names.

The router reads a connection's first request head, under the gateway's limits (it
answers 400, 408, 414 and 431 itself, as the gateway would), and asks ``resolve`` which
app serves that host. No app: 404. Then:

- plain TCP: the connection itself is handed to the app process (``HandoffClient``:
  the socket, by SCM_RIGHTS, with the bytes already read), and the router forgets it.
  The app's gateway serves it from the first byte, keep-alive and WebSocket upgrades
  included, and sees the client's real address, since it owns the socket.
- TLS: the router terminates TLS and splices the plaintext both ways to the app's
  ``http`` unix socket, with back pressure each way. The app sees the router as its
  peer: the client's address is not passed on (the gateway has no place to put it yet).

Either way, an app whose socket does not accept (not started, restarting) gets the
client a 503 with ``Retry-After: 1``.

Over 400 lines: the Router and its _Client protocol share the connection states, the
limits and the hand-off (a client moves from reading a head to spliced or handed over);
they change together.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import ssl as ssl_module
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

import httptools

from ..gateway.connections import Connections
from ..gateway.handoff import HandoffClient, check_peer
from ..gateway.limits import GatewayLimits
from ..gateway.protocol import _simple_response, _too_large, _valid_host

__all__ = ["Endpoint", "Router"]

log = logging.getLogger("dockyard.router")

# Bytes a head may span beyond ``max_head`` before it is cut off (as the gateway's slice).
_SLACK = 4 * 1024
# How long connecting to an app's socket may take before the client gets a 503.
_CONNECT_TIMEOUT = 5.0


class Endpoint(Protocol):
    """Where an app process takes connections (``node.appproc.AppEndpoint``). When it
    also has a ``pid`` (not None), the sockets must be served by that process."""

    @property
    def handoff(self) -> Path: ...

    @property
    def http(self) -> Path: ...


Resolve = Callable[[str], Endpoint | None]


class Router:
    """Listens on ``host:port`` (TLS with ``ssl``) and routes connections by Host."""

    def __init__(
        self,
        resolve: Resolve,
        *,
        host: str = "127.0.0.1",
        port: int = 8787,
        ssl: ssl_module.SSLContext | None = None,
        limits: GatewayLimits | None = None,
        handoff_pool: int = 4,
    ) -> None:
        self.resolve = resolve
        self.host = host
        self.port = port
        self.ssl = ssl
        self.limits = limits or GatewayLimits()
        self._handoff = HandoffClient(pool=handoff_pool)
        self._connections: Connections[_Client] = Connections(self.limits.max_connections)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Client(self),
            self.host,
            self.port,
            ssl=self.ssl,
            reuse_address=True,
            backlog=self.limits.backlog,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening and close the connections still here. Spliced (TLS) ones get
        ``limits.stop_grace`` to end first, so answers in flight get through. (Handed-off
        connections are no longer here: their app processes drain them.)"""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        spliced = []
        for connection in self._connections:
            if connection.spliced:
                spliced.append(connection.ended)
            else:
                connection.close()
        if spliced:
            await asyncio.wait(spliced, timeout=self.limits.stop_grace)
        for connection in self._connections:
            connection.close()
        self._handoff.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        self._server = None

    def _route(self, client: _Client, host: str) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(client, host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, client: _Client, host: str) -> None:
        try:
            endpoint = self.resolve(host)
        except Exception:
            log.exception("resolving host %r failed", host)
            client.finish(_plain(500, "Internal Server Error\n"))
            return
        if endpoint is None:
            client.finish(_plain(404, f"no application at {host}\n"))
            return
        try:
            try:
                await self._connect(client, endpoint)
            except (FileNotFoundError, ConnectionRefusedError):
                # A deploy's new process may have taken over since the lookup, and the
                # old one's sockets gone with it: ask again, once.
                again = self.resolve(host)
                if again is None or again.handoff == endpoint.handoff:
                    raise
                await self._connect(client, again)
        except (OSError, TimeoutError) as exc:
            log.info("application at %s not accepting connections: %s", host, exc)
            client.finish(_plain(503, f"{host} is not available\n", retry_after=True))

    async def _connect(self, client: _Client, endpoint: Endpoint) -> None:
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            pid = getattr(endpoint, "pid", None)
            if self.ssl is None:
                fd = client.dup()
                if fd is None:
                    return  # the client left
                try:
                    await self._handoff.send(endpoint.handoff, fd, client.initial, pid=pid)
                finally:
                    os.close(fd)
                client.handed_off()
            else:
                await client.splice(endpoint.http, pid)


class _State(enum.Enum):
    HEAD = 1  # reading the first request head
    ROUTING = 2  # resolving and connecting; reading paused
    SPLICE = 3  # (TLS) bytes pass both ways
    CLOSING = 4  # answered by the router, or handed off: nothing more to do


class _Client(asyncio.Protocol):
    """One client connection, until it is handed off, spliced or answered."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._limits = router.limits
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._state = _State.HEAD
        self._head = _Head(router.limits)
        self._held = b""  # bytes that came while routing (TLS delivers some after pausing)
        self._timer: asyncio.TimerHandle | None = None
        self._upstream: _Upstream | None = None
        self.ended: asyncio.Future[None] = self._loop.create_future()

    @property
    def spliced(self) -> bool:
        return self._state is _State.SPLICE

    @property
    def idle(self) -> bool:
        """Nothing received yet (such connections are closed first when at the limit)."""
        return self._state is _State.HEAD and not self._head.buffered

    @property
    def initial(self) -> bytes:
        return self._head.buffered + self._held

    def dup(self) -> int | None:
        """A descriptor of the client's socket of our own, None once it is gone.

        Sent instead of the transport's own: should the client go while the hand-off
        waits, the transport's descriptor number could be another connection's by then.
        """
        if self._state is not _State.ROUTING or self.transport is None:
            return None
        return os.dup(self.transport.get_extra_info("socket").fileno())

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self._router._connections.add(self):
            self._state = _State.CLOSING
            self.transport.write(_plain(503, "Service Unavailable: too many connections\n"))
            self.close()
            return
        self._timer = self._loop.call_later(self._limits.header_timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is _State.SPLICE:
            assert self._upstream is not None and self._upstream.transport is not None
            self._upstream.transport.write(data)
            return
        if state is _State.ROUTING:
            self._held += data
            return
        if state is not _State.HEAD:
            return  # the router has answered: dropped while lingering
        outcome = self._head.feed(data)
        if outcome is None:
            return
        self._cancel_timer()
        if isinstance(outcome, bytes):
            self.finish(outcome)
            return
        self._state = _State.ROUTING
        assert self.transport is not None
        self.transport.pause_reading()
        self._router._route(self, outcome)

    def eof_received(self) -> bool | None:
        if self._state is _State.SPLICE and self._upstream is not None:
            upstream = self._upstream.transport
            if upstream is not None and upstream.can_write_eof():
                upstream.write_eof()  # the app answers what it has, then closes
                return True
        if self._state is _State.HEAD:
            self._state = _State.CLOSING
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _State.CLOSING
        if not self.ended.done():
            self.ended.set_result(None)
        self._router._connections.discard(self)
        self._cancel_timer()
        if self._upstream is not None:
            self._upstream.close()

    def pause_writing(self) -> None:
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.resume_reading()

    # outcomes

    def handed_off(self) -> None:
        """The app process has the socket: close this copy, quietly."""
        self._state = _State.CLOSING
        if self.transport is not None:
            # (closing a descriptor another process holds sends nothing to the client)
            self.transport.abort()

    async def splice(self, path: Path, pid: int | None) -> None:
        """Connect to the app's unix socket and pass bytes both ways from now on."""
        transport, upstream = await self._loop.create_unix_connection(
            lambda: _Upstream(self, self._limits.write_timeout), str(path)
        )
        if pid is not None:
            try:
                check_peer(transport.get_extra_info("socket"), pid)
            except OSError:
                transport.abort()
                raise
        if self._state is not _State.ROUTING or self.transport is None:
            upstream.close()  # the client left meanwhile
            return
        self._upstream = upstream
        self._state = _State.SPLICE
        assert upstream.transport is not None
        upstream.transport.write(self.initial)
        self._held = b""
        self.transport.resume_reading()

    def finish(self, answer: bytes) -> None:
        """Send the router's own answer and close, reading (and dropping) what the
        client still sends for a moment, as the gateway does: a close with unread bytes
        would reset the connection, and could destroy the answer."""
        transport = self.transport
        if transport is None or self._state is _State.CLOSING or transport.is_closing():
            return
        self._state = _State.CLOSING
        transport.write(answer)
        if not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        transport.resume_reading()
        self._cancel_timer()
        self._timer = self._loop.call_later(self._limits.linger_timeout, self.close)

    def close(self) -> None:
        _close(self.transport, self._loop, self._limits.write_timeout)

    # timers

    def _too_slow(self) -> None:
        self._timer = None
        if self._head.buffered:
            self.finish(_simple_response(408, "Request Timeout: headers too slow\n"))
        else:
            self._state = _State.CLOSING
            self.close()  # never said a word: nothing to answer

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Upstream(asyncio.Protocol):
    """The router's side of a spliced connection to an app's gateway."""

    def __init__(self, client: _Client, write_timeout: float) -> None:
        self._client = client
        self._write_timeout = write_timeout
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self._client.transport
        if client is not None and not client.is_closing():
            client.write(data)

    def eof_received(self) -> bool | None:
        self._client.close()  # (TLS cannot half-close: after the app's last byte, close)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.close()

    def pause_writing(self) -> None:
        if self._client.transport is not None:
            self._client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._client.transport is not None:
            self._client.transport.resume_reading()

    def close(self) -> None:
        _close(self.transport, asyncio.get_running_loop(), self._write_timeout)


class _Stop(Exception):
    """Raised from a parser callback: the head is complete, or refused."""


class _Head:
    """The first request head of a connection, parsed under the gateway's limits."""

    def __init__(self, limits: GatewayLimits) -> None:
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self.buffered = b""
        self._hosts: list[str] = []
        self._url = 0
        self._head = 0
        self._count = 0
        self._complete = False
        self._rejection: bytes | None = None

    def feed(self, data: bytes) -> str | bytes | None:
        """The host once the head is complete, the answer refusing it, or None (more)."""
        self.buffered = self.buffered + data if self.buffered else data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # (the head is complete; the app does the upgrade)
        except httptools.HttpParserError:
            if not self._complete and self._rejection is None:
                self._rejection = _simple_response(400, "Bad Request: malformed HTTP\n")
        if self._rejection is not None:
            return self._rejection
        if self._complete:
            return self._host()
        if len(self.buffered) > self._limits.max_head + _SLACK:
            return _too_large(431, "request head", self._limits.max_head)
        return None

    def _host(self) -> str | bytes:
        if len(self._hosts) != 1:
            what = "no Host header" if not self._hosts else "more than one Host header"
            return _simple_response(400, f"Bad Request: {what}\n")
        value = self._hosts[0].strip()
        if not _valid_host(value):
            return _simple_response(400, "Bad Request: invalid Host header\n")
        name = value.lower()
        if name.startswith("["):
            name = name[: name.index("]") + 1]
        else:
            name = name.partition(":")[0].rstrip(".")
        if not name:
            return _simple_response(400, "Bad Request: invalid Host header\n")
        return name

    # httptools callbacks

    def on_url(self, url: bytes) -> None:
        self._url += len(url)
        if self._url > self._limits.max_url:
            self._rejection = _too_large(414, "URL", self._limits.max_url)
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._limits
        size = len(name) + len(value)
        self._count += 1
        self._head += size
        if size > limits.max_header_line:
            self._rejection = _too_large(431, "header line", limits.max_header_line)
        elif self._count > limits.max_headers:
            self._rejection = _too_large(431, "header count", limits.max_headers)
        elif self._head > limits.max_head:
            self._rejection = _too_large(431, "request head", limits.max_head)
        if self._rejection is not None:
            raise _Stop
        if name.lower() == b"host":
            self._hosts.append(value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._complete = True
        raise _Stop  # the rest is the app's to parse


def _plain(status: int, text: str, *, retry_after: bool = False) -> bytes:
    answer = _simple_response(status, text)
    if retry_after:
        answer = answer.replace(b"\r\n\r\n", b"\r\nRetry-After: 1\r\n\r\n", 1)
    return answer


def _close(
    transport: asyncio.Transport | None, loop: asyncio.AbstractEventLoop, wait: float
) -> None:
    """Close after the buffer drains, or abort after ``wait`` if the peer does not read."""
    if transport is not None and not transport.is_closing():
        transport.close()
        if transport.get_write_buffer_size():
            loop.call_later(wait, transport.abort)
