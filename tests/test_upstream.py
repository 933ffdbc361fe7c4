"""The lean last-hop HTTP client, against real servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from dockyard.containers.proxy import forward_http
from dockyard.containers.upstream import UpstreamError, UpstreamPool
from dockyard.errors import ContainerGone, InvalidHeader
from dockyard.http import Request


async def serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.AppRunner:
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def port_of(runner: web.AppRunner) -> int:
    return runner.addresses[0][1]


async def echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    return web.Response(
        body=body,
        headers={
            "X-Method": request.method,
            "X-Path": request.path_qs,
            "X-Chunked": str(request.headers.get("Transfer-Encoding") == "chunked"),
            "X-Host": request.headers.get("Host", ""),
        },
    )


async def test_keep_alive_reuses_one_connection_and_bodies_round_trip() -> None:
    runner = await serve(echo)
    pool = UpstreamPool()
    try:
        for i in range(20):
            response = await pool.request(
                port_of(runner), "POST", f"/p?i={i}", [("Host", "container")], f"n{i}".encode()
            )
            assert response.status == 200
            assert dict(response.headers)["X-Path"] == f"/p?i={i}"
            assert dict(response.headers)["X-Host"] == "container"
            assert await response.read() == f"n{i}".encode()
        assert pool.open_connections == 1
    finally:
        pool.close()
        await runner.cleanup()


async def test_a_request_cancelled_in_the_pass_it_was_made_in_never_reaches_the_container() -> None:
    # Requests are written at the end of the event loop's pass, with the others made in
    # it (SendBatch); one whose caller is cancelled before then is dropped unsent.
    # (Alone, a request is written at once: another must be waiting for its answer.)
    seen: list[str] = []
    holding, release = asyncio.Event(), asyncio.Event()

    async def record(request: web.Request) -> web.Response:
        seen.append(request.path)
        if request.path == "/hold":
            holding.set()
            await release.wait()
        return web.Response(text="ok")

    runner = await serve(record)
    pool = UpstreamPool()
    try:
        held = asyncio.create_task(
            pool.request(port_of(runner), "GET", "/hold", [("Host", "container")])
        )
        await asyncio.wait_for(holding.wait(), 5)
        warm = await pool.request(port_of(runner), "GET", "/warm", [("Host", "container")])
        assert await warm.read() == b"ok"  # the next request reuses this connection
        made = asyncio.create_task(
            pool.request(port_of(runner), "GET", "/cancelled", [("Host", "container")])
        )
        await asyncio.sleep(0)  # the request is made and kept for the end of the pass
        made.cancel()
        with pytest.raises(asyncio.CancelledError):
            await made
        release.set()
        assert await (await held).read() == b"ok"
        after = await pool.request(port_of(runner), "GET", "/after", [("Host", "container")])
        assert await after.read() == b"ok"
        assert seen == ["/hold", "/warm", "/after"]
    finally:
        pool.close()
        await runner.cleanup()


async def test_streamed_request_bodies_are_chunked_unless_their_length_is_known() -> None:
    runner = await serve(echo)
    pool = UpstreamPool()

    async def parts() -> AsyncIterator[bytes]:
        for piece in (b"abc", b"def", b"g"):
            yield piece

    try:
        response = await pool.request(port_of(runner), "PUT", "/", [], parts())
        assert dict(response.headers)["X-Chunked"] == "True"
        assert await response.read() == b"abcdefg"
        response = await pool.request(
            port_of(runner), "PUT", "/", [("Content-Length", "7")], parts()
        )
        assert dict(response.headers)["X-Chunked"] == "False"
        assert await response.read() == b"abcdefg"
    finally:
        pool.close()
        await runner.cleanup()


async def test_large_streamed_response_with_flow_control() -> None:
    size = 20 * 1024 * 1024

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no length known
        await response.prepare(request)
        chunk = os.urandom(1 << 16)
        for _ in range(size // len(chunk)):
            await response.write(chunk)
        await response.write_eof()
        return response

    runner = await serve(big)
    pool = UpstreamPool()
    try:
        response = await pool.request(port_of(runner), "GET", "/", [])
        assert response.content_length is None
        received = 0
        async for chunk in response.iter_chunks():
            received += len(chunk)
            if received < 4 << 20:
                await asyncio.sleep(0)  # a slow reader: the buffer must stay bounded
            assert response.body.buffered <= 2 << 20
        assert received == size
        assert pool.open_connections == 1  # kept for the next request
    finally:
        pool.close()
        await runner.cleanup()


async def test_a_closed_idle_connection_is_replaced_transparently() -> None:
    served = 0

    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # Keep-alive promised, but the server drops the connection once idle.
        writer.close()

    server = await asyncio.start_server(once_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool()
    try:
        for _ in range(3):
            response = await pool.request(port, "GET", "/", [])
            assert await response.read() == b"ok"
        assert served == 3
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def test_body_until_close_and_informational_responses() -> None:
    async def legacy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(legacy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool()
    try:
        response = await pool.request(port, "GET", "/", [])
        assert response.status == 200
        assert await response.read() == b"until the end"
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def test_failures_are_upstream_errors() -> None:
    pool = UpstreamPool()
    sock_server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = sock_server.sockets[0].getsockname()[1]
    sock_server.close()
    await sock_server.wait_closed()
    with pytest.raises(UpstreamError, match=f"cannot connect to 127.0.0.1:{port}"):
        await pool.request(port, "GET", "/", [])

    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(truncated, "127.0.0.1", 0)
    response = await pool.request(server.sockets[0].getsockname()[1], "GET", "/", [])
    with pytest.raises(UpstreamError, match="closed the connection"):
        await response.read()
    with pytest.raises(InvalidHeader, match="line break"):
        await pool.request(port, "GET", "/", [("X-Evil", "a\r\nInjected: 1")])
    for bad in ([("X-Evil", "a\x00b")], [("Bad Name", "v")], [("X-Evil", "\u20ac")]):
        with pytest.raises(InvalidHeader):
            await pool.request(port, "GET", "/", bad)
    with pytest.raises(InvalidHeader):
        await pool.request(port, "GET", "/a b", [])
    pool.close()
    server.close()
    await server.wait_closed()


async def raw_server(
    answer: bytes, heads: list[bytes], *, close: bool = False
) -> tuple[asyncio.Server, int]:
    """A server that records each request head and sends ``answer`` to each."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    heads.append(await reader.readuntil(b"\r\n\r\n"))
                    writer.write(answer)
                    await writer.drain()
                    if close:
                        break
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_header_bytes_go_out_and_come_back_unchanged() -> None:
    heads: list[bytes] = []
    answer = b"HTTP/1.1 200 OK\r\nX-Back: caf\xe9\xff\r\nContent-Length: 0\r\n\r\n"
    server, port = await raw_server(answer, heads)
    pool = UpstreamPool()
    try:
        response = await pool.request(port, "GET", "/", [("X-Bytes", "caf\xe9\x80\xff")])
        await response.read()
        assert b"\r\nX-Bytes: caf\xe9\x80\xff\r\n" in heads[0]
        assert ("X-Back", "caf\xe9\xff") in response.headers
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def test_head_answers_have_no_body_and_keep_the_connection() -> None:
    heads: list[bytes] = []
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n"
    server, port = await raw_server(answer, heads)
    pool = UpstreamPool()
    try:
        for _ in range(3):
            response = await pool.request(port, "HEAD", "/", [])
            assert response.status == 200 and response.content_length == 12345
            assert await asyncio.wait_for(response.read(), 5) == b""
        assert len(heads) == 3 and pool.open_connections == 1
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def test_a_malformed_head_answer_is_an_upstream_error() -> None:
    server, port = await raw_server(b"HTTP/1.1 OK-ish\r\nnot a header\r\n\r\n", [], close=True)
    pool = UpstreamPool()
    try:
        with pytest.raises(UpstreamError, match="malformed"):
            await pool.request(port, "HEAD", "/", [])
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def test_a_malformed_head_answer_through_the_proxy_is_502() -> None:
    server, port = await raw_server(b"HTTP/1.1 OK-ish\r\nnot a header\r\n\r\n", [], close=True)
    pool = UpstreamPool()
    finished: list[bool] = []
    try:
        with pytest.raises(ContainerGone) as caught:
            await forward_http(
                pool,
                port,
                Request("http://container/", method="HEAD"),
                on_finished=lambda: finished.append(True),
                on_lost=lambda exc: ContainerGone(str(exc)),
            )
        assert caught.value.status == 502 and finished == [True]
    finally:
        pool.close()
        server.close()
        await server.wait_closed()
