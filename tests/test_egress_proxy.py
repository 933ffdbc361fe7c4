"""The egress proxy on a plain loopback socket (no container): request and response bodies
both ways, streaming, framing and the answers it makes itself, byte for byte. aiohttp's
client speaks to it as to any HTTP proxy."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest_asyncio
from aiohttp import web

from dockyard.containers.egress_proxy import EgressProxy
from dockyard.containers.outbound import EgressRules, Handler, call_handler
from dockyard.http import Request, Response


class Handlers:
    """Stands for the Container instance handlers are called on."""

    async def echo(self, request: Request) -> Response:
        body = await request.bytes()
        return Response(
            b"handler got " + body,
            headers={"x-method": request.method, "x-length": str(len(body))},
        )

    async def stream(self, request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"part {i}\n".encode()

        return Response(chunks())

    async def broken(self, request: Request) -> Response:
        raise RuntimeError("boom")


@dataclass
class Rig:
    proxy_url: str
    origin_port: int
    rules: list[EgressRules]
    proxy_port: int


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    async def origin_answer(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.Response(
            body=b"origin got " + body,
            headers={"x-seen-host": request.host},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", origin_answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    origin_port = runner.addresses[0][1]
    rules = [
        EgressRules(
            enable_internet=False,
            allowed_hosts=("origin.test", "api.internal", "*.handled"),
            outbound_by_host={
                "api.internal": "echo",
                "stream.handled": "stream",
                "broken.handled": "broken",
            },
        )
    ]
    instance = Handlers()

    async def handle(handler: Handler, request: Request) -> Response:
        return await call_handler(instance, handler, request)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    proxy_port = listener.getsockname()[1]
    async with aiohttp.ClientSession() as forwarding:
        proxy = EgressProxy(
            "test",
            lambda: rules[0],
            handle,
            forwarding,
            hosts={"origin.test": f"127.0.0.1:{origin_port}"},
        )
        await proxy.start(listener)
        try:
            yield Rig(f"http://127.0.0.1:{proxy_port}", origin_port, rules, proxy_port)
        finally:
            await proxy.aclose()
            await runner.cleanup()


async def test_bodies_go_through_both_ways_forwarded_and_handled(rig: Rig) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            "http://origin.test/upload", data=b"x" * 200_000, proxy=rig.proxy_url
        ) as response:
            assert response.status == 200
            assert await response.read() == b"origin got " + b"x" * 200_000
            # The origin saw the name the container asked for, not the mapped address.
            assert response.headers["x-seen-host"] == "origin.test"

        async def chunked() -> AsyncIterator[bytes]:
            for piece in (b"a" * 10, b"b" * 70_000, b"c"):
                yield piece

        async with session.put(
            "http://api.internal/x", data=chunked(), proxy=rig.proxy_url
        ) as response:
            assert response.status == 200
            assert response.headers["x-method"] == "PUT"
            assert response.headers["x-length"] == "70011"
            assert (await response.read()).startswith(b"handler got aaaaaaaaaab")

        async with session.get("http://stream.handled/", proxy=rig.proxy_url) as response:
            assert await response.text() == "part 0\npart 1\npart 2\n"

        async with session.head("http://api.internal/h", proxy=rig.proxy_url) as response:
            assert response.status == 200
            assert await response.read() == b""


async def test_blocked_failed_and_unreachable_answers(rig: Rig) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get("http://elsewhere.test/", proxy=rig.proxy_url) as response:
            assert response.status == 520
            assert await response.text() == (
                "Egress blocked: elsewhere.test is not in allowed_hosts\n"
            )
        async with session.get("http://broken.handled/", proxy=rig.proxy_url) as response:
            assert response.status == 500
            assert "outbound handler failed (error id " in await response.text()
        # Rules are read per request: a change applies to the next one.
        rig.rules[0] = rig.rules[0].replace(denied_hosts=("origin.test",))
        async with session.get("http://origin.test/", proxy=rig.proxy_url) as response:
            assert response.status == 520


async def test_requests_that_are_not_for_a_proxy_get_400(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy_port)
    writer.write(b"GET /not-absolute HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b"this is an HTTP proxy: send absolute http:// URLs, or CONNECT\n")
