"""The gateway under hostile clients, workers and containers, on real sockets on loopback.

Each test here failed on the gateway before issue 8/9's hardening (see the report that
came with it): header injection, lost bytes, hangs, unbounded heads and buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dockyard.containers.upstream import UpstreamPool
from dockyard.errors import ContainerGone
from dockyard.gateway.server import Gateway, GatewayLimits
from dockyard.http import Request, Response, WebSocketPair


class Source:
    """A response body that records how it ended; ``stall`` makes it wait after a chunk."""

    def __init__(self, chunk: bytes = b"x" * 65536, *, chunks: int | None = None) -> None:
        self.chunk = chunk
        self.left = chunks
        self.sent = 0
        self.closed = asyncio.Event()
        self.stall = asyncio.Event()  # never set: a chunk that never comes
        self.stalled = asyncio.Event()

    def __aiter__(self) -> Source:
        return self

    async def __anext__(self) -> bytes:
        if self.left is not None:
            if self.left == 0:
                self.stalled.set()
                await self.stall.wait()
            self.left -= 1
        self.sent += len(self.chunk)
        return self.chunk

    async def aclose(self) -> None:
        self.closed.set()


@contextlib.asynccontextmanager
async def serving(dispatch: Any, **limits: Any) -> AsyncIterator[int]:
    gateway = Gateway(dispatch, port=0, limits=GatewayLimits(**limits))
    port = await gateway.start()
    try:
        yield port
    finally:
        await gateway.stop()


async def exchange(port: int, raw: bytes, wait: float = 5.0) -> bytes:
    """Send ``raw``, return everything until the server closes (fail if it never does)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await asyncio.wait_for(_read_all(reader), wait)
    finally:
        writer.close()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    parts = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(1 << 16):
            parts.append(chunk)
    return b"".join(parts)


def close_request(path: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: a\r\n%sConnection: close\r\n\r\n" % (path.encode(), extra)


# 1. Response splitting and byte-exact headers


async def test_bad_response_headers_never_reach_the_wire(caplog: pytest.LogCaptureFixture) -> None:
    bad = {
        "/crlf": [("X-A", "a\r\nInjected: 1")],
        "/lf": [("X-A", "a\nInjected: 1")],
        "/nul": [("X-A", "a\x00b")],
        "/name": [("Bad Name", "v")],
        "/colon": [("X:Injected", "v")],
        "/wide": [("X-A", "\u20ac")],  # beyond latin-1: no byte for it
    }

    async def dispatch(request: Request) -> Response:
        return Response("body", headers=bad.get(request.path, []))

    caplog.set_level(logging.ERROR, "dockyard.gateway")
    async with serving(dispatch) as port:
        for path in bad:
            data = await exchange(port, close_request(path))
            head = data.split(b"\r\n\r\n")[0]
            assert data.startswith(b"HTTP/1.1 500 Internal Server Error"), (path, data)
            assert b"Injected" not in data and b"\x00" not in head and b"Bad Name" not in data
            assert b"error id" in data
        # A good header still goes out, and the keep-alive connection stays usable.
        data = await exchange(port, close_request("/fine"))
        assert data.startswith(b"HTTP/1.1 200 OK")
    assert sum("error id" in r.getMessage() for r in caplog.records) == len(bad)


async def test_header_bytes_are_carried_exactly_both_ways() -> None:
    seen: list[bytes] = []

    async def container(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\nX-Back: caf\xe9 \xff\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(container, "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool()

    async def dispatch(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "connection"]
        upstream = await pool.request(upstream_port, "GET", "/", headers)
        return Response(await upstream.read(), headers=upstream.headers)

    try:
        async with serving(dispatch) as port:
            data = await exchange(port, close_request("/", b"X-Bytes: caf\xe9 \xff\x80\r\n"))
        assert b"\r\nX-Bytes: caf\xe9 \xff\x80\r\n" in seen[0]
        assert b"\r\nX-Back: caf\xe9 \xff\r\n" in data
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


# 3. Bad Host headers, and errors escaping the request loop


@pytest.mark.parametrize("host", [b"127.0.0.1:abc", b"[::1", b"x:1:2", b":99999", b"a:65536"])
async def test_bad_host_headers_get_400_and_a_close(host: bytes) -> None:
    async def dispatch(request: Request) -> Response:
        return Response(request.path)

    async with serving(dispatch) as port:
        data = await exchange(port, b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400 Bad Request")
        assert (await exchange(port, close_request("/ok")))[:15] == b"HTTP/1.1 200 OK"


async def test_good_hosts_pass() -> None:
    async def dispatch(request: Request) -> Response:
        return Response(request.url)

    async with serving(dispatch) as port:
        for host in (b"example.com", b"127.0.0.1:8787", b"[::1]:80", b"a-b_c.d"):
            raw = b"GET /p HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
            data = await exchange(port, raw)
            assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"/p"), host


async def test_an_answer_that_cannot_be_written_ends_in_a_close() -> None:
    async def dispatch(request: Request) -> Response:
        response = Response("x")
        response.status = "not a number"  # type: ignore[assignment]
        return response

    async with serving(dispatch) as port:
        assert await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == b""


# 4. A body that fails mid-stream (the container was killed)


async def test_a_container_dying_mid_body_closes_the_client_connection_at_once() -> None:
    async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(20):
                writer.write(b"10000\r\n" + b"y" * 0x10000 + b"\r\n")
            await writer.drain()
        finally:
            writer.transport.abort()  # killed: no terminating chunk

    server = await asyncio.start_server(dying, "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool()

    async def relay() -> AsyncIterator[bytes]:
        upstream = await pool.request(upstream_port, "GET", "/", [])
        try:
            async for chunk in upstream.iter_chunks():
                yield chunk
        except ConnectionError as exc:
            raise ContainerGone("the container went away") from exc

    async def dispatch(request: Request) -> Response:
        return Response(relay())

    try:
        async with serving(dispatch) as port:
            data = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", wait=5)
        assert data.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in data
        assert not data.endswith(b"0\r\n\r\n")
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


# 5. Limits on request heads


async def test_head_limits_answer_414_and_431() -> None:
    async def dispatch(request: Request) -> Response:
        return Response("ok")

    async with serving(dispatch) as port:
        data = await exchange(port, close_request("/" + "u" * 9000))
        assert data.startswith(b"HTTP/1.1 414 ")
        data = await exchange(port, close_request("/", b"X-Long: " + b"v" * 9000 + b"\r\n"))
        assert data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
        many = b"".join(b"X-%d: v\r\n" % i for i in range(101))
        data = await exchange(port, close_request("/", many))
        assert data.startswith(b"HTTP/1.1 431")
        big = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 7000) for i in range(12))
        data = await exchange(port, close_request("/", big))
        assert data.startswith(b"HTTP/1.1 431")
        # Just under every limit is fine.
        fine = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 7000) for i in range(8))
        data = await exchange(port, close_request("/" + "u" * 8000, fine))
        assert data.startswith(b"HTTP/1.1 200 OK")


async def test_a_huge_header_is_cut_off_without_reading_it_all() -> None:
    async def dispatch(request: Request) -> Response:
        return Response("ok")

    sent = 0

    async def send_huge_header(writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Huge: ")
        with contextlib.suppress(ConnectionError):
            while sent < 64 << 20:  # 64 MiB, unless the server stops us first
                writer.write(b"h" * (1 << 16))
                await writer.drain()
                sent += 1 << 16

    async with serving(dispatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sender = asyncio.create_task(send_huge_header(writer))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        answered_after = sent
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    assert head.startswith(b"HTTP/1.1 431")
    assert answered_after < 16 << 20


async def test_pipelined_requests_parsed_ahead_are_bounded() -> None:
    release = asyncio.Event()
    answered = 0

    async def dispatch(request: Request) -> Response:
        nonlocal answered
        await release.wait()
        answered += 1
        return Response("ok")

    async with serving(dispatch, max_pipelined=8) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 2000)
        # The first request is with the worker; wait until the gateway stops reading.
        for _ in range(200):
            await asyncio.sleep(0)
        parsed = sum(isinstance(o, Request) for o in gc.get_objects())
        release.set()
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < 2000:
            data += await asyncio.wait_for(reader.read(1 << 16), 10)
        writer.close()
    # The bound: max_pipelined, plus what one 4 KiB slice of input holds (28-byte requests).
    assert parsed <= 8 + 4096 // 28 + 2
    assert answered == 2000


# 6. Slow bodies, clients that do not read


async def test_a_stalled_request_body_gets_408() -> None:
    async def dispatch(request: Request) -> Response:
        return Response(await request.bytes())

    async with serving(dispatch, body_timeout=0.3) as port:
        raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"z" * 10
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)  # and never the other 90 bytes
        data = await asyncio.wait_for(_read_all(reader), 5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 408 Request Timeout")
        assert b"Connection: close" in data


async def test_a_client_that_does_not_read_is_cut_off_and_the_body_closed() -> None:
    source = Source()

    async def dispatch(request: Request) -> Response:
        return Response(source)

    async with serving(dispatch, write_timeout=0.3) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # and never reads
        try:
            await asyncio.wait_for(source.closed.wait(), 5)
        finally:
            sock.close()
    assert source.sent < 32 << 20  # the socket buffers, not the whole stream


# 7. Connection limit, file limit


async def test_over_the_connection_limit_the_oldest_idle_connection_goes() -> None:
    release = asyncio.Event()
    all_blocked = asyncio.Event()
    blocked = 0

    async def dispatch(request: Request) -> Response:
        nonlocal blocked
        if request.path == "/block":
            blocked += 1
            if blocked == 3:
                all_blocked.set()
            await release.wait()
        return Response("ok")

    async with serving(dispatch, max_connections=3) as port:
        idle = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"ok"), 5)
            idle.append((reader, writer))
        # A fourth client is served; the oldest idle one is closed for it.
        assert (await exchange(port, close_request("/")))[:15] == b"HTTP/1.1 200 OK"
        assert await asyncio.wait_for(idle[0][0].read(), 5) == b""
        for _, writer in idle:
            writer.close()
        # When every connection is busy, a new one is refused with 503.
        busy = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /block HTTP/1.1\r\nHost: a\r\n\r\n")
            busy.append((reader, writer))
        await asyncio.wait_for(all_blocked.wait(), 5)
        data = await exchange(port, close_request("/"))
        assert data.startswith(b"HTTP/1.1 503")
        release.set()
        for reader, writer in busy:
            assert b"ok" in await asyncio.wait_for(reader.readuntil(b"ok"), 5)
            writer.close()


def test_the_soft_file_limit_is_raised_to_the_hard_one() -> None:
    code = (
        "import resource\n"
        "from dockyard._limits import raise_open_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "assert raise_open_file_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    soft, hard = map(int, out.stdout.split())
    assert soft == hard or soft >= 1 << 20


# 8. Smaller: backlog, one Date, pipelined garbage


async def test_the_listen_backlog_is_the_configured_one() -> None:
    async def dispatch(request: Request) -> Response:
        return Response("ok")

    async with serving(dispatch, backlog=777) as port:
        ss = await asyncio.create_subprocess_exec(
            "ss", "-ltnH", f"sport = :{port}", stdout=asyncio.subprocess.PIPE
        )
        out = (await ss.communicate())[0].split()
        assert out[2] == b"777"  # Send-Q of a listening socket is its backlog


async def test_a_response_with_its_own_date_gets_only_that_one() -> None:
    async def dispatch(request: Request) -> Response:
        return Response("ok", headers={"Date": "Tue, 01 Dec 2026 00:00:00 GMT"})

    async with serving(dispatch) as port:
        data = await exchange(port, close_request("/"))
    assert data.count(b"\r\nDate: ") == 1 and b"Date: Tue, 01 Dec 2026" in data


async def test_a_pipelined_request_then_garbage_still_gets_its_answer() -> None:
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    gate = asyncio.Event()

    async def dispatch(request: Request) -> Response:
        await gate.wait()
        return Response("answered")

    async with serving(dispatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\x00\x01 NOT HTTP AT ALL\r\n\r\n")
        for _ in range(50):
            await asyncio.sleep(0)
        gate.set()
        data = await asyncio.wait_for(_read_all(reader), 5)
        writer.close()
    gc.collect()
    for _ in range(5):
        await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert data.startswith(b"HTTP/1.1 200 OK") and b"answered" in data
    assert b"HTTP/1.1 400 Bad Request" in data
    assert errors == []


# 9. stop() ends its tasks; unfinished bodies are always closed


async def test_stop_cancels_and_awaits_answers_still_running() -> None:
    started = asyncio.Event()
    outcome: list[str] = []

    async def dispatch(request: Request) -> Response:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        return Response("never")

    gateway = Gateway(dispatch, port=0, limits=GatewayLimits(stop_grace=0.2))
    port = await gateway.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(gateway.stop(), 5)
    assert outcome == ["cancelled"]  # done by the time stop() returned
    assert await asyncio.wait_for(_read_all(reader), 5) == b""
    writer.close()


async def test_a_client_leaving_while_the_body_waits_closes_the_body_at_once() -> None:
    source = Source(chunks=1)  # one chunk, then a long silence (an idle event stream)

    async def dispatch(request: Request) -> Response:
        return Response(source)

    async with serving(dispatch) as port:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(source.stalled.wait(), 5)
        writer.transport.abort()
        await asyncio.wait_for(source.closed.wait(), 5)


async def test_a_body_is_closed_when_the_client_left_before_the_answer() -> None:
    source = Source()
    entered = asyncio.Event()
    answer = asyncio.Event()

    async def dispatch(request: Request) -> Response:
        entered.set()
        await answer.wait()
        return Response(source)

    async with serving(dispatch) as port:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(entered.wait(), 5)
        writer.transport.abort()
        for _ in range(50):  # let the gateway see the client go
            await asyncio.sleep(0)
        answer.set()
        await asyncio.wait_for(source.closed.wait(), 5)
    assert source.sent == 0


# 2. WebSockets: a bounded queue between the two ends


async def test_a_websocket_sender_waits_for_a_slow_receiver() -> None:
    client, server = WebSocketPair()
    sent = 0

    async def flood() -> None:
        nonlocal sent
        for i in range(1000):
            await client.send(f"m{i}")
            sent += 1

    task = asyncio.create_task(flood())
    for _ in range(200):
        await asyncio.sleep(0)
    assert not task.done() and sent <= 32  # waiting for the receiver, not queueing 1000
    received = [await server.receive() for _ in range(1000)]
    await asyncio.wait_for(task, 5)
    assert [m.data for m in received] == [f"m{i}" for i in range(1000)]
    # With the queue full, a sender waits; a close is never held back and wakes it.
    for i in range(16):
        await client.send(f"x{i}")
    waiting = asyncio.create_task(client.send("one too many"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiting.done()
    await server.close()
    await asyncio.wait_for(waiting, 1)  # dropped: the other end is gone
    assert (await client.receive()).type == "close"
