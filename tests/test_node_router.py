"""The node's router on real sockets: Host routing, hand-off of connections to app gateways
(in this process, and in another one), the TLS splice, and the router's own answers."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import uvloop

from dockyard.gateway.handoff import HandoffServer
from dockyard.gateway.server import Dispatch, Gateway, GatewayLimits
from dockyard.http import Request, Response, WebSocketPair
from dockyard.node.router import Router
from tests.support.certs import self_signed


@dataclass(frozen=True)
class Endpoint:
    handoff: Path
    http: Path
    pid: int | None = None  # the process that must serve them (as node.appproc's)


def app_dispatch(name: str, slow: tuple[asyncio.Event, asyncio.Event] | None = None) -> Dispatch:
    async def dispatch(request: Request) -> Response:
        if request.path == "/slow" and slow is not None:
            started, release = slow
            started.set()
            await release.wait()
        if request.path == "/echo":
            return Response(await request.bytes())
        if request.path == "/ws":
            client, server = WebSocketPair()
            server.accept()

            async def echo() -> None:
                async for message in server:
                    text = message if isinstance(message, str) else message.decode()
                    await server.send(f"{name}: {text}")
                await server.close()

            asyncio.get_running_loop().create_task(echo())
            return Response(None, status=101, web_socket=client)
        return Response(f"{name} {request.method} {request.path} {request.headers['host']}")

    return dispatch


class Apps:
    """App gateways listening on unix sockets in ``directory``, each with a hand-off socket."""

    def __init__(self, directory: Path, stack: AsyncExitStack) -> None:
        self.directory = directory
        self.stack = stack
        self.endpoints: dict[str, Endpoint] = {}
        self.handoffs: dict[str, HandoffServer] = {}
        # /slow: ``started`` is set when it begins; it answers once ``release`` is set
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def add(self, name: str) -> Endpoint:
        endpoint = Endpoint(self.directory / f"{name}.ho", self.directory / f"{name}.http")
        gateway = Gateway(app_dispatch(name, (self.started, self.release)), path=endpoint.http)
        await self.stack.enter_async_context(gateway)
        self.handoffs[name] = await self.stack.enter_async_context(
            HandoffServer(gateway, endpoint.handoff)
        )
        self.endpoints[f"{name}.example"] = endpoint
        return endpoint

    def resolve(self, host: str) -> Endpoint | None:
        return self.endpoints.get(host)


@pytest.fixture
async def apps(tmp_path: Path) -> AsyncIterator[Apps]:
    async with AsyncExitStack() as stack:
        apps = Apps(tmp_path, stack)
        await apps.add("a")
        await apps.add("b")
        yield apps


@pytest.fixture
async def router(apps: Apps) -> AsyncIterator[Router]:
    async with Router(apps.resolve, host="127.0.0.1", port=0) as router:
        yield router


async def exchange(port: int, raw: bytes, *, context: ssl.SSLContext | None = None) -> bytes:
    """Send ``raw``, read until the server closes."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="a.example" if context else None
    )
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response with a Content-Length: (head, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return head, body


def status_and_body(data: bytes) -> tuple[int, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_connections_go_to_the_app_their_host_names(router: Router) -> None:
    a = await exchange(
        router.port, b"GET /x HTTP/1.1\r\nHost: A.Example:8787\r\nConnection: close\r\n\r\n"
    )
    b = await exchange(
        router.port, b"GET /y HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n"
    )
    assert status_and_body(a) == (200, b"a GET /x A.Example:8787")
    assert status_and_body(b) == (200, b"b GET /y b.example")


async def test_unknown_host_is_404_with_a_plain_message(router: Router) -> None:
    data = await exchange(router.port, b"GET / HTTP/1.1\r\nHost: nowhere.example:80\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"Content-Type: text/plain; charset=utf-8\r\n" in data
    assert status_and_body(data) == (404, b"no application at nowhere.example\n")


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example/../x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: <script>\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
async def test_missing_or_bad_host_is_400(router: Router, head: bytes) -> None:
    data = await exchange(router.port, head)
    assert status_and_body(data)[0] == 400
    assert b"Connection: close\r\n" in data


async def test_an_app_that_does_not_accept_gets_503_then_serves_again(
    apps: Apps, router: Router
) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"
    assert status_and_body(await exchange(router.port, raw))[0] == 200  # (pools a connection)
    await apps.handoffs["a"].stop()  # the app process restarting
    data = await exchange(router.port, raw)
    assert status_and_body(data) == (503, b"a.example is not available\n")
    assert b"Retry-After: 1\r\n" in data
    await apps.handoffs["a"].start()
    assert status_and_body(await exchange(router.port, raw)) == (200, b"a GET / a.example")
    apps.endpoints["gone.example"] = Endpoint(apps.directory / "x.ho", apps.directory / "x.http")
    data = await exchange(router.port, raw.replace(b"a.example", b"gone.example"))
    assert status_and_body(data)[0] == 503


async def test_a_connection_routed_as_the_app_switches_process_reaches_the_new_one(
    apps: Apps,
) -> None:
    """A deploy's new process took over between the route lookup and the hand-off: the
    old one's sockets are gone. The router asks again and delivers to the new one."""
    gone = Endpoint(apps.directory / "old.ho", apps.directory / "old.http")
    answers = [gone]

    def resolve(host: str) -> Endpoint | None:
        return answers.pop() if answers else apps.resolve(host)

    raw = b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"
    async with Router(resolve, host="127.0.0.1", port=0) as router:
        assert status_and_body(await exchange(router.port, raw)) == (200, b"a GET / a.example")


async def test_sockets_served_by_another_process_than_the_apps_get_503(
    apps: Apps, router: Router
) -> None:
    a = apps.endpoints["a.example"]
    apps.endpoints["mine.example"] = Endpoint(a.handoff, a.http, pid=os.getpid())
    apps.endpoints["squatted.example"] = Endpoint(a.handoff, a.http, pid=1)
    raw = b"GET / HTTP/1.1\r\nHost: mine.example\r\nConnection: close\r\n\r\n"
    assert status_and_body(await exchange(router.port, raw)) == (200, b"a GET / mine.example")
    data = await exchange(router.port, raw.replace(b"mine", b"squatted"))
    assert status_and_body(data) == (503, b"squatted.example is not available\n")


async def test_keep_alive_continues_on_the_app_after_the_hand_off(router: Router) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    for path in (b"/one", b"/two", b"/three"):
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: b.example\r\n\r\n")
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert body == b"b GET " + path + b" b.example"
    writer.close()


async def test_bytes_after_the_first_head_are_not_lost(router: Router) -> None:
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /second HTTP/1.1\r\nHost: a.example\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nbye"
    )
    data = await exchange(router.port, raw)
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert data.index(b"hello") < data.index(b"a GET /second a.example") < data.index(b"bye")


async def test_a_body_sent_after_the_head_arrives_whole(router: Router) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    body = os.urandom(300_000)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: a.example\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    await writer.drain()
    writer.write(body)
    _, echoed = await read_response(reader)
    assert echoed == body
    writer.close()


async def test_a_websocket_upgrade_is_served_by_the_app(router: Router) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(
            f"http://127.0.0.1:{router.port}/ws", headers={"Host": "b.example"}
        ) as ws:
            await ws.send_str("hi")
            assert await asyncio.wait_for(ws.receive_str(), 10) == "b: hi"


async def test_a_slow_head_gets_408(apps: Apps) -> None:
    limits = GatewayLimits(header_timeout=0.3, linger_timeout=0.2)
    async with Router(apps.resolve, host="127.0.0.1", port=0, limits=limits) as router:
        data = await exchange(router.port, b"GET / HTTP/1.1\r\nHost: a.ex")
        assert status_and_body(data) == (408, b"Request Timeout: headers too slow\n")
        # a connection that never sends a byte is closed without an answer
        assert await exchange(router.port, b"") == b""


async def test_an_oversized_head_gets_431(router: Router) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a.example\r\n" + b"X-Big: " + b"x" * 9000 + b"\r\n\r\n"
    assert status_and_body(await exchange(router.port, raw))[0] == 431
    many = b"".join(b"X-%d: y\r\n" % i for i in range(101))
    raw = b"GET / HTTP/1.1\r\nHost: a.example\r\n" + many + b"\r\n"
    assert status_and_body(await exchange(router.port, raw))[0] == 431
    # a header too long to ever end, sent in pieces, is cut off
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Big: ")
    for _ in range(40):
        writer.write(b"x" * 4096)
        await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    assert status_and_body(data)[0] == 431
    writer.close()


def open_fds() -> set[str]:
    """What this process's descriptors point to (sockets by inode)."""
    targets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            pass  # (the descriptor listing the directory)
    return targets


async def leaked_since(before: set[str]) -> set[str]:
    """Descriptors open now and not in ``before``, once none is left (or after 5 s):
    connections just served close a moment later (lingering closes)."""
    for _ in range(500):
        extra = open_fds() - before
        if not extra:
            return extra
        await asyncio.sleep(0.01)  # polling a condition, not setting up a race
    return open_fds() - before


async def test_no_descriptor_is_leaked(apps: Apps, tmp_path: Path) -> None:
    limits = GatewayLimits(header_timeout=0.3, linger_timeout=0.1)
    apps.endpoints["gone.example"] = Endpoint(tmp_path / "x.ho", tmp_path / "x.http")
    async with Router(apps.resolve, host="127.0.0.1", port=0, limits=limits) as router:
        heads = [
            b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: b.example\r\n\r\nGET / HTTP/1.1\r\nHost: b.example\r\n"
            b"Connection: close\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: gone.example\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.ex",
        ]
        # One round first: it opens what stays open (the pooled hand-off connections).
        await asyncio.gather(*(exchange(router.port, raw) for raw in heads))
        before = open_fds()
        for _ in range(5):
            await asyncio.gather(*(exchange(router.port, raw) for raw in heads))
        # clients that leave mid-head, and right after a head
        for raw in (b"GET / HT", b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"):
            _, writer = await asyncio.open_connection("127.0.0.1", router.port)
            writer.write(raw)
            await writer.drain()
            writer.transport.abort()
        assert await leaked_since(before) == set()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path, "a.example", "b.example")


async def test_tls_is_terminated_and_spliced_to_the_app(
    apps: Apps, certificate: tuple[Path, Path]
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(*certificate)
    client_context = ssl.create_default_context(cafile=str(certificate[0]))
    async with Router(apps.resolve, host="127.0.0.1", port=0, ssl=server_context) as router:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", router.port, ssl=client_context, server_hostname="a.example"
        )
        writer.write(b"GET /one HTTP/1.1\r\nHost: a.example\r\n\r\n")
        _, body = await read_response(reader)
        assert body == b"a GET /one a.example"
        # a body bigger than every buffer on the way, both ways (back pressure)
        payload = os.urandom(4 * 1024 * 1024)
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: a.example\r\nContent-Length: %d\r\n\r\n" % len(payload)
        )
        writer.write(payload)
        _, echoed = await read_response(reader)
        assert echoed == payload
        writer.write(b"GET /two HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        _, body = await read_response(reader)
        assert body == b"a GET /two a.example"
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the app's close comes through
        writer.close()
        data = await exchange(
            router.port, b"GET / HTTP/1.1\r\nHost: c.example\r\n\r\n", context=client_context
        )
        assert status_and_body(data) == (404, b"no application at c.example\n")
        b = apps.endpoints["b.example"]
        apps.endpoints["squatted.example"] = Endpoint(b.handoff, b.http, pid=1)
        data = await exchange(
            router.port, b"GET / HTTP/1.1\r\nHost: squatted.example\r\n\r\n", context=client_context
        )
        assert status_and_body(data)[0] == 503
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(
                f"https://127.0.0.1:{router.port}/ws",
                headers={"Host": "b.example"},
                ssl=client_context,
            ) as ws:
                await ws.send_str("hi")
                assert await asyncio.wait_for(ws.receive_str(), 10) == "b: hi"


async def test_stopping_lets_spliced_answers_in_flight_finish(
    apps: Apps, certificate: tuple[Path, Path]
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(*certificate)
    client_context = ssl.create_default_context(cafile=str(certificate[0]))
    router = Router(apps.resolve, host="127.0.0.1", port=0, ssl=server_context)
    port = await router.start()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context, server_hostname="a.example"
    )
    writer.write(b"GET /slow HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
    await asyncio.wait_for(apps.started.wait(), 10)
    stopping = asyncio.ensure_future(router.stop())  # (runs before the answer is made)
    apps.release.set()
    _, body = await read_response(reader)
    assert body == b"a GET /slow a.example"
    await asyncio.wait_for(stopping, 10)
    writer.close()


APP_PROCESS = textwrap.dedent(
    """
    import asyncio, os, sys
    from dockyard.gateway.handoff import HandoffServer
    from dockyard.gateway.server import Gateway
    from dockyard.http import Response

    async def dispatch(request):
        return Response(f"pid {os.getpid()} {request.path}")

    async def main():
        async with Gateway(dispatch, path=sys.argv[2]) as gateway:
            async with HandoffServer(gateway, sys.argv[1]):
                print("READY", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
    """
)


async def test_connections_are_handed_to_another_process(tmp_path: Path) -> None:
    endpoint = Endpoint(tmp_path / "p.ho", tmp_path / "p.http")
    child = subprocess.Popen(  # noqa: ASYNC220 (started once; waited for off the loop)
        [sys.executable, "-c", APP_PROCESS, str(endpoint.handoff), str(endpoint.http)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
        assert line == b"READY\n"
        async with Router(lambda host: endpoint, host="127.0.0.1", port=0) as router:
            reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
            for path in (b"/first", b"/second"):
                writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: p.example\r\n\r\n")
                _, body = await read_response(reader)
                assert body == b"pid %d %s" % (child.pid, path)
            writer.close()
    finally:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()  # the app process ends at the end of its stdin
        child.stdout.close()
        child.wait(10)


def test_bytes_handed_over_are_parsed_before_those_still_in_the_socket(tmp_path: Path) -> None:
    # The socket already holds the rest when the gateway takes it: the hand-over's bytes
    # must still be parsed first. On uvloop (what `dockyard serve` runs), feeding them
    # after connect_accepted_socket returns is too late; the default loop hides that.
    async def scenario() -> bytes:
        dispatch = app_dispatch("a")
        async with Gateway(dispatch, path=tmp_path / "a.http") as gateway:
            client, server = socket.socketpair()
            with client:
                client.sendall(
                    b"world" + b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                )
                await gateway.serve_accepted(
                    server, b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello"
                )
                client.setblocking(False)
                loop = asyncio.get_running_loop()
                data = b""
                while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 10):
                    data += chunk
                return data

    data = uvloop.run(scenario())
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert data.index(b"\r\n\r\nhelloworld") < data.index(b"a GET /after a")


async def test_connections_over_the_limit_are_refused(
    apps: Apps, certificate: tuple[Path, Path]
) -> None:
    # Over TLS a connection stays with the router (spliced), so it counts against the limit.
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(*certificate)
    client_context = ssl.create_default_context(cafile=str(certificate[0]))
    limits = GatewayLimits(max_connections=1)
    async with Router(
        apps.resolve, host="127.0.0.1", port=0, ssl=server_context, limits=limits
    ) as router:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", router.port, ssl=client_context, server_hostname="a.example"
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        _, body = await read_response(reader)
        assert body == b"a GET / a.example"
        raw = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
        data = await exchange(router.port, raw, context=client_context)
        assert status_and_body(data) == (503, b"Service Unavailable: too many connections\n")
        writer.close()
