"""The gateway's HTTP/1.1 handling, byte for byte, on a real socket on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from dockyard._flow import SendBatch
from dockyard.gateway.server import Gateway, GatewayLimits
from dockyard.http import Request, Response, WebSocketPair

# Set by the /stream body when its source is closed; made per test (events bind a loop).
stream_closed: dict[str, asyncio.Event] = {}
# /hold answers once this is set (made per test).
release: dict[str, asyncio.Event] = {}


class Endless:
    """A body source with no finalizer of its own (like the proxy's relay): only an
    explicit ``aclose()`` tells it the client is gone."""

    def __aiter__(self) -> Endless:
        return self

    async def __anext__(self) -> bytes:
        return b"x" * 65536

    async def aclose(self) -> None:
        stream_closed["endless"].set()


async def dispatch(request: Request) -> Response:
    if request.path == "/echo":
        return Response(await request.bytes(), headers={"X-Method": request.method})
    if request.path == "/ignore-body":
        return Response("did not read it")
    if request.path == "/stream":
        return Response(Endless())
    if request.path == "/slow":
        await asyncio.sleep(1.0)
        return Response("slow")
    if request.path == "/hold":
        await release["hold"].wait()
        return Response("held")
    if request.path == "/chunks":

        async def chunks() -> AsyncIterator[bytes]:
            for part in (b"alpha-", b"beta-", b"gamma"):
                yield part

        return Response(chunks())
    if request.path == "/ws":
        client, server = WebSocketPair()
        server.accept()

        async def echo() -> None:
            async for message in server:
                await server.send(message)
            await server.close()

        asyncio.get_running_loop().create_task(echo())
        return Response(None, status=101, web_socket=client)
    return Response(
        f"{request.method} {request.url}", headers={"X-Host": request.headers.get("host", "")}
    )


async def exchange(port: int, raw: bytes, *, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10) if read_until_close else b""
    writer.close()
    return data


@pytest.fixture
async def port() -> AsyncIterator[int]:
    gateway = Gateway(dispatch, port=0)
    bound = await gateway.start()
    yield bound
    await gateway.stop()


async def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    raw = (
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    data = await exchange(port, raw)
    assert data.count(b"HTTP/1.1 200 OK") == 3
    first, second, third = (
        data.index(b"GET http://a/one"),
        data.index(b"hello"),
        data.index(b"GET http://a/three"),
    )
    assert first < second < third
    assert b"Connection: close" in data


async def test_answers_kept_for_the_end_of_the_pass_stay_in_order_with_every_other_write(
    port: int,
) -> None:
    # Small answers are written at the end of the event loop's pass (while another
    # connection's answer is in the making: /hold); a streamed answer and the final 400
    # are written at once. Neither may overtake an answer still waiting for its pass.
    release["hold"] = asyncio.Event()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n")
    raw = (
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /chunks HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
        b"NOT HTTP AT ALL\r\n\r\n"
    )
    data = await exchange(port, raw)
    marks = [
        b"GET http://a/one",
        b"alpha-",
        b"gamma\r\n0\r\n\r\n",
        b"GET http://a/two",
        b"HTTP/1.1 400 Bad Request",
    ]
    places = [data.find(mark) for mark in marks]
    assert -1 not in places, data
    assert places == sorted(places), data
    # A kept answer followed by the connection's close: sent before it.
    data = await exchange(port, b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"GET http://a/last"), data
    release["hold"].set()
    assert (await asyncio.wait_for(reader.readuntil(b"held"), 5)).startswith(b"HTTP/1.1 200")
    writer.close()


class _Recorded:
    """A client socket standing in for the real one: it records what is written."""

    def __init__(self, log: list[bytes]) -> None:
        self.log = log

    def write(self, data: bytes) -> None:
        self.log.append(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def get_write_buffer_size(self) -> int:
        return 0


async def test_answers_made_in_one_pass_of_the_loop_are_written_together_at_its_end() -> None:
    # Written one by one, each answer woke its client while the others were still being
    # made; together, a burst of requests wakes each peer once (SendBatch).
    written: list[bytes] = []
    seen_when_answering: list[int] = []

    async def answer(request: Request) -> Response:
        await asyncio.sleep(0)  # as an answer from a container: all eight in the making
        seen_when_answering.append(len(written))
        return Response("ok\n")

    gateway = Gateway(answer, port=0)
    protocols = [gateway.protocol() for _ in range(8)]
    for protocol in protocols:
        protocol.connection_made(_Recorded(written))  # type: ignore[arg-type]
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    assert seen_when_answering == [0] * 8
    assert len(written) == 8 and all(w.endswith(b"\r\n\r\nok\n") for w in written)
    for protocol in protocols:
        protocol.connection_lost(None)


async def test_an_answer_with_no_other_in_the_making_is_written_at_once() -> None:
    # Nothing could share its batch: keeping it for the end of the pass would only
    # delay it (about 15% fewer requests a second at one connection, measured).
    written: list[bytes] = []

    async def answer(request: Request) -> Response:
        return Response("ok\n")

    gateway = Gateway(answer, port=0)
    protocol = gateway.protocol()
    protocol.connection_made(_Recorded(written))  # type: ignore[arg-type]
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    # Runs right after the step that answers, before anything that step schedules.
    when_answered: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(lambda: when_answered.set_result(len(written)))
    assert await when_answered == 1
    protocol.connection_lost(None)


async def test_one_failed_send_does_not_keep_the_other_connections_answers_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    batch = SendBatch(asyncio.get_running_loop())
    sent: list[int] = []

    class Sender:
        def __init__(self, n: int) -> None:
            self.n = n

        def send_unsent(self) -> None:
            if self.n == 1:
                raise RuntimeError("a transport closed behind the sender's back")
            sent.append(self.n)

    for n in range(3):
        batch.add(Sender(n))
    await asyncio.sleep(0)
    assert sent == [0, 2]
    assert "A send failed (error id " in caplog.text


async def test_http_1_0_closes_and_chunked_upload_is_read(port: int) -> None:
    data = await exchange(port, b"GET /x HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in data
    chunked = (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    data = await exchange(port, chunked)
    assert data.endswith(b"abcde") and b"Content-Length: 5" in data


async def test_expect_continue_gets_an_interim_answer_in_its_turn(port: int) -> None:
    post = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    # Another connection's answer in the making: the answer to /one is kept for the end
    # of the pass (SendBatch), and the 100 Continue written after it must not overtake it.
    release["hold"] = asyncio.Event()
    _, holder = await asyncio.open_connection("127.0.0.1", port)
    holder.write(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n")
    for before in (b"", b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(before + post)
        if before:
            # The interim answer belongs to the second request: sent before the answer
            # to the first, the client would take it for the first one's.
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 OK")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert (await reader.readexactly(length)).startswith(b"GET http://a/one")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(b"abc")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert await reader.readexactly(3) == b"abc"
        writer.close()
    release["hold"].set()
    holder.close()


async def continue_in_turn(pipelined: bytes, answers_before: list[bytes], body: bytes) -> None:
    """Send ``pipelined`` (body timeout 0.5 s), read the answers ahead (a mark of each),
    then expect the last request's 100 Continue; its body then comes back echoed."""
    gateway = Gateway(dispatch, port=0, limits=GatewayLimits(body_timeout=0.5))
    port = await gateway.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(pipelined)
        for mark in answers_before:
            await asyncio.wait_for(reader.readuntil(mark), 5)
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK"), head
        assert await reader.readexactly(len(body)) == body
        writer.close()
    finally:
        await gateway.stop()


async def test_a_body_waiting_for_its_turns_100_continue_is_not_timed_out_meanwhile() -> None:
    # The client sends the body only once told to: its time starts with the 100 Continue,
    # not with its head, which came in behind a slower answer (1 s).
    await continue_in_turn(
        b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Expect: 100-continue\r\n\r\n",
        [b"slow"],
        b"abc",
    )


async def test_a_100_continue_owed_to_a_later_request_survives_an_earlier_ones_turn() -> None:
    # The second request sends its body without waiting for its 100 Continue; the third
    # waits to be told. The second's turn must not take the third's owed 100 with it:
    # the third is not late while the second's answer (1 s) is being made.
    await continue_in_turn(
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Expect: 100-continue\r\n\r\nabc"
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Expect: 100-continue\r\n\r\n",
        [b"GET http://a/first", b"slow"],
        b"xyz",
    )


async def test_malformed_requests_get_400_and_hosts_cannot_rewrite_paths(port: int) -> None:
    data = await exchange(port, b"THIS IS NOT HTTP\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 Bad Request")
    data = await exchange(
        port, b"GET /real HTTP/1.1\r\nHost: evil/other?\r\nConnection: close\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 400 Bad Request") and b"/real" not in data


async def test_an_unread_body_closes_the_connection(port: int) -> None:
    raw = b"POST /ignore-body HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"z" * 10
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await asyncio.wait_for(reader.read(), 5)  # the server closes: EOF
    assert data.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in data
    writer.close()


async def test_a_client_leaving_mid_stream_closes_the_body_source(port: int) -> None:
    stream_closed["endless"] = asyncio.Event()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
    await reader.readexactly(200_000)
    writer.transport.abort()

    await asyncio.wait_for(stream_closed["endless"].wait(), 5)


async def test_websocket_upgrade_on_a_reused_keep_alive_connection(port: int) -> None:
    connector = aiohttp.TCPConnector(limit=1)  # forces the upgrade onto the same socket
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"http://127.0.0.1:{port}/first") as response:
            assert response.status == 200
            await response.read()
        async with session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            await ws.send_str("over the same connection")
            assert (await ws.receive(timeout=5)).data == "over the same connection"


async def test_a_keep_alive_client_too_slow_with_its_next_head_gets_408() -> None:
    # The head timer is armed only when a head outlasts the read it began in: a second
    # request on a kept-alive connection whose head stops half way still times out.
    gateway = Gateway(dispatch, port=0, limits=GatewayLimits(header_timeout=0.3))
    port = await gateway.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHo")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert first.startswith(b"HTTP/1.1 200 OK")
        rest = await asyncio.wait_for(reader.read(), 5)
        assert b"HTTP/1.1 408 Request Timeout" in rest
        writer.close()
    finally:
        await gateway.stop()


def test_request_path_and_query_follow_a_reassigned_url() -> None:
    request = Request("http://a/one?x=1")
    assert (request.path, request.query_string, request.query["x"]) == ("/one", "x=1", "1")
    request.url = "http://a/two?x=2"
    assert (request.path, request.query_string, request.query["x"]) == ("/two", "x=2", "2")


async def test_a_client_too_slow_to_send_its_headers_gets_408() -> None:
    gateway = Gateway(dispatch, port=0, limits=GatewayLimits(header_timeout=0.3))
    port = await gateway.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n")  # and never the blank line
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 408 Request Timeout")
        writer.close()
        # A prompt client on the same server is unaffected.
        assert (await exchange(port, b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))[
            :15
        ] == b"HTTP/1.1 200 OK"
    finally:
        await gateway.stop()


async def test_a_kept_alive_connection_closes_one_keep_alive_timeout_after_its_last_answer() -> (
    None
):
    gateway = Gateway(dispatch, port=0, limits=GatewayLimits(keep_alive_timeout=1.0))
    port = await gateway.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        # Requests every quarter of the timeout for longer than it: the timer armed at
        # connection fires in between, while the connection has been idle briefly.
        last = loop.time()
        for n in range(6):
            writer.write(f"GET /{n} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            ended, last = last, loop.time()
            assert last - ended < 0.9, "the machine stalled longer than the keep-alive timeout"
            await asyncio.sleep(0.25)
        writer.write(b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"GET http://a/last"), 5)
        last = loop.time()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
        # (10 ms: the engine's timers have millisecond resolution)
        assert loop.time() - last >= 1.0 - 0.01
        writer.close()
    finally:
        await gateway.stop()
