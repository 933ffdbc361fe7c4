"""The egress proxy of one container: HTTP in absolute form and CONNECT, with the rules of
outbound.py applied to every request.

It listens on a socket made inside the container's own network namespace (netns.py, or
egress_handoff.py on a node) and is served by Dockyard's loop: forwarded requests leave
from Dockyard's namespace, handlers run beside the object. A forwarded request never goes
to the host's own loopback unless the operator mapped the name there (``hosts``, as
``curl --resolve`` does): otherwise a container could reach every service the host keeps
on 127.0.0.1 (the node's control plane among them).

One request per connection: the proxy answers with ``Connection: close``, and a body of
unknown length ends with the connection, so nothing is re-framed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

import aiohttp
from yarl import URL

from ..errors import error_id
from ..http import HOP_BY_HOP, Request, Response
from .outbound import BLOCKED_STATUS, EgressRules, Handler, normalize_host

__all__ = ["EgressProxy"]

log = logging.getLogger("dockyard.containers")

_MAX_HEADERS = 100
_CONNECT_TIMEOUT = 10.0
_PIPE_CHUNK = 64 * 1024
# Sent by the container to the proxy only; never passed on.
_PROXY_ONLY = frozenset({"proxy-authorization", "proxy-connection"})


class _Refused(Exception):
    """The proxy answers the container with ``status`` and ``text``."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class EgressProxy:
    """One container's egress proxy: ``start(sock)`` serves a listening socket (made in
    the container's namespace), ``aclose()`` stops listening and ends every connection.

    ``rules`` is read for every request, so setters take effect at once. ``handle`` runs a
    handler (on the object's instance). ``hosts`` maps names (``host`` or ``host:port``)
    to ``ip`` or ``ip:port``, as ``curl --resolve``. Outbound requests are not activity:
    they do not keep the container from sleeping (as on Cloudflare, where only requests
    to the container count).
    """

    def __init__(
        self,
        name: str,
        rules: Callable[[], EgressRules],
        handle: Callable[[Handler, Request], Awaitable[Response]],
        session: aiohttp.ClientSession,
        hosts: Mapping[str, str] | None = None,
    ) -> None:
        self._name = name
        self._rules = rules
        self._handle = handle
        self._session = session
        self._hosts = {normalize_host(k): v for k, v in (hosts or {}).items()}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"egress proxy of {self._name}"

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._serve, sock=sock)

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one connection: one request (the proxy answers with Connection: close) ---------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._one_request(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("%s: request failed", self)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        line = (await reader.readuntil(b"\r\n")).decode("latin-1").rstrip("\r\n")
        method, _, rest = line.partition(" ")
        target, _, version = rest.partition(" ")
        headers = await _read_headers(reader)
        try:
            if not version.startswith("HTTP/1."):
                raise _Refused(400, "not an HTTP/1.x request")
            if method == "CONNECT":
                await self._tunnel(target, reader, writer)
                return
            url = URL(target)
            if not url.is_absolute() or url.scheme != "http" or not url.host:
                raise _Refused(400, "this is an HTTP proxy: send absolute http:// URLs, or CONNECT")
            body = _request_body(reader, headers)
            request = Request(url, method=method, headers=_end_to_end(headers), body=body)
            response = await self._answer(url, request)
        except _Refused as refused:
            response = _plain(refused.status, refused.text)
        await _write_response(writer, response, head=method == "HEAD")

    async def _answer(self, url: URL, request: Request) -> Response:
        host = url.host or ""
        decision = self._rules().decide(host)
        if decision.action == "block":
            log.info("%s: blocked %s %s (%s)", self, request.method, url, decision.why)
            raise _Refused(BLOCKED_STATUS, f"Egress blocked: {decision.why}")
        if decision.action == "handle":
            assert decision.handler is not None
            try:
                return await self._handle(decision.handler, request)
            except Exception as exc:
                ident = error_id()
                log.exception("%s: outbound handler failed (error %s)", self, ident)
                raise _Refused(500, f"outbound handler failed (error id {ident})") from exc
        port = url.port or 80
        ip, port = await self._resolve(host, port)
        target = url.with_host(ip).with_port(port)
        if "host" not in request.headers:
            request.headers["host"] = url.raw_authority
        try:
            upstream = await self._session.request(
                request.method,
                target,
                headers=request.headers,
                data=request.stream() if request.has_body else None,
                allow_redirects=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT),
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _Refused(502, f"cannot reach {host}:{port}: {exc}") from exc
        return Response(
            _release_after(upstream),
            status=upstream.status,
            headers=_end_to_end(upstream.headers),
        )

    async def _tunnel(
        self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host, sep, port_text = target.rpartition(":")
        if not sep or not port_text.isdigit():
            raise _Refused(400, "CONNECT needs host:port")
        decision = self._rules().decide_tunnel(host)
        if decision.action == "block":
            log.info("%s: blocked CONNECT %s (%s)", self, target, decision.why)
            raise _Refused(BLOCKED_STATUS, f"Egress blocked: {decision.why}")
        ip, port = await self._resolve(host, int(port_text))
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                up_reader, up_writer = await asyncio.open_connection(ip, port)
        except (OSError, TimeoutError) as exc:
            raise _Refused(502, f"cannot reach {target}: {exc}") from exc
        try:
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
            await _pipe_both(reader, writer, up_reader, up_writer)
        finally:
            up_writer.close()

    async def _resolve(self, host: str, port: int) -> tuple[str, int]:
        host = normalize_host(host)
        mapped = self._hosts.get(f"{host}:{port}") or self._hosts.get(host)
        if mapped is not None:
            ip, sep, mapped_port = mapped.rpartition(":")
            if sep and mapped_port.isdigit() and not mapped.endswith("]"):
                return ip.strip("[]"), int(mapped_port)
            return mapped.strip("[]"), port
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise _Refused(502, f"cannot resolve {host}: {exc}") from exc
        ip = str(infos[0][4][0])
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_loopback or address.is_unspecified:
            raise _Refused(
                BLOCKED_STATUS, f"Egress blocked: {host} resolves to {ip}, the host itself"
            )
        return ip, port


async def _read_headers(reader: asyncio.StreamReader) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    while True:
        line = (await reader.readuntil(b"\r\n")).decode("latin-1").rstrip("\r\n")
        if not line:
            return headers
        if len(headers) >= _MAX_HEADERS:
            raise ConnectionError("too many headers")
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))


def _end_to_end(headers: Any) -> list[tuple[str, str]]:
    items = headers.items() if hasattr(headers, "items") else headers
    return [
        (k, v) for k, v in items if k.lower() not in HOP_BY_HOP and k.lower() not in _PROXY_ONLY
    ]


def _request_body(
    reader: asyncio.StreamReader, headers: list[tuple[str, str]]
) -> AsyncIterator[bytes] | None:
    lowered = {k.lower(): v for k, v in headers}
    if "chunked" in lowered.get("transfer-encoding", "").lower():
        return _chunked(reader)
    length = int(lowered.get("content-length", "0") or 0)
    return _sized(reader, length) if length > 0 else None


async def _sized(reader: asyncio.StreamReader, length: int) -> AsyncIterator[bytes]:
    while length > 0:
        chunk = await reader.read(min(length, _PIPE_CHUNK))
        if not chunk:
            raise ConnectionError("request body ended early")
        length -= len(chunk)
        yield chunk


async def _chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size_line = (await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip()
        size = int(size_line, 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers: dropped
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def _release_after(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.content.iter_chunked(_PIPE_CHUNK):
            yield chunk
    finally:
        upstream.release()


def _plain(status: int, text: str) -> Response:
    return Response(text + "\n", status=status, headers={"content-type": "text/plain"})


async def _write_response(writer: asyncio.StreamWriter, response: Response, *, head: bool) -> None:
    """Write ``response`` and end the connection: a body of unknown length is delimited
    by the close (HTTP/1.1 allows it), so nothing is re-framed."""
    reason = _REASONS.get(response.status) or _reason(response.status)
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    length = response.body_length
    for name, value in response.headers.items():
        if name.lower() in HOP_BY_HOP or (name.lower() == "content-length" and length is not None):
            continue
        lines.append(f"{name}: {value}")
    if length is not None:
        lines.append(f"content-length: {length}")
    lines.append("connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    stream = response.stream()
    try:
        if not head:
            async for chunk in stream:
                writer.write(chunk)
                await writer.drain()
        await writer.drain()
    finally:
        await stream.aclose()


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await source.read(_PIPE_CHUNK):
                sink.write(chunk)
                await sink.drain()

    # The container's end of file is not passed on: many servers (aiohttp's among them)
    # drop a connection that half-closes before they answered. Once either side ended,
    # the other gets a bounded time to finish, then the tunnel closes.
    up = asyncio.ensure_future(pipe(reader, up_writer))
    down = asyncio.ensure_future(pipe(up_reader, writer))
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait({down}, timeout=_CONNECT_TIMEOUT)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)


_REASONS = {BLOCKED_STATUS: "Origin Disallowed"}


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"
