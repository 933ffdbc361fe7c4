"""The WebSocket Hibernation API: sockets outlive their object's eviction."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from tests.support.compat import cf_project
from tests.support.devserver import DevServer

CHAT = """
import json

from js import WebSocketPair, WebSocketRequestResponsePair
from workers import DurableObject, Response, WorkerEntrypoint

BUILT = 0


class Chat(DurableObject):
    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        global BUILT
        BUILT += 1
        print(f"BUILT {BUILT}", flush=True)
        ctx.setWebSocketAutoResponse(WebSocketRequestResponsePair.new("ping", "pong"))

    async def fetch(self, request):
        client, server = WebSocketPair.new().object_values()
        self.ctx.acceptWebSocket(server, [request.query.get("room", "lobby")])
        server.serializeAttachment({"joined": len(self.ctx.getWebSockets())})
        return Response(None, status=101, web_socket=client)

    async def webSocketMessage(self, ws, message):
        if message == "count":
            everyone, red = self.ctx.getWebSockets(), self.ctx.getWebSockets("red")
            ws.send(f"{len(everyone)} {len(red)} built {BUILT}")
        elif message == "attachment":
            ws.send(json.dumps(ws.deserializeAttachment()))
        elif message == "broadcast":
            for other in self.ctx.getWebSockets():
                other.send("hello all")
        else:
            ws.send("echo " + message)

    async def webSocketClose(self, ws, code, reason, was_clean):
        print(f"CLOSED {code} {reason!r} {was_clean}", flush=True)
        ws.close(code, "bye")


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return await self.env.CHAT.getByName("room").fetch(request)
"""

CONFIG = {
    "durable_objects": {"bindings": [{"name": "CHAT", "class_name": "Chat"}]},
    "migrations": [{"tag": "v1", "new_sqlite_classes": ["Chat"]}],
}
IDLE = "0.3"  # --object-idle-timeout: seconds before an idle object leaves memory


async def ask(ws: aiohttp.ClientWebSocketResponse, text: str) -> str:
    await ws.send_str(text)
    return str(await asyncio.wait_for(ws.receive_str(), 10))


async def wait_for_rebuild(ws: aiohttp.ClientWebSocketResponse, built: int) -> str:
    """Ask until the object answers from a newer instance than ``built`` (it was evicted)."""
    for _ in range(50):
        answer = await ask(ws, "count")
        if int(answer.rsplit(" ", 1)[1]) > built:
            return answer
        # The object stays in memory while messages keep coming: give it an idle spell.
        await asyncio.sleep(float(IDLE) + 0.2)
    raise AssertionError("the object was never evicted and rebuilt")


async def test_messages_tags_attachments_and_auto_response(tmp_path: Path) -> None:
    project = cf_project(tmp_path, CHAT, CONFIG)
    with DevServer(project, "--object-idle-timeout", IDLE) as server:
        url = server.url.replace("http", "ws")
        async with aiohttp.ClientSession() as session:
            red = await session.ws_connect(url + "/?room=red")
            blue = await session.ws_connect(url + "/?room=blue")
            assert await ask(red, "count") == "2 1 built 1"
            assert await ask(blue, "hi") == "echo hi"
            # The object is evicted while both sockets stay open, and rebuilt by a message.
            assert await wait_for_rebuild(blue, 1) == "2 1 built 2"
            # What the first instance attached to each socket is still there.
            assert await ask(red, "attachment") == '{"joined": 1}'
            assert await ask(blue, "attachment") == '{"joined": 2}'
            # Auto-response: answered by the runtime, the object is not involved. (The
            # console is read in another thread: wait until it has the rebuild's line.)
            server.wait_for(r"BUILT 2")
            built_lines = server.output.count("BUILT")
            assert await ask(red, "ping") == "pong"
            assert server.output.count("BUILT") == built_lines
            await blue.send_str("broadcast")
            assert await red.receive_str() == "hello all"
            assert await blue.receive_str() == "hello all"
            await red.close(code=4001, message=b"leaving")
            # The code arrives; the gateway does not pass the client's close reason on.
            server.wait_for(r"CLOSED 4001 '' True")
            assert (await ask(blue, "count")).startswith("1 0 built ")
            await blue.close()


@pytest.mark.slow
async def test_a_thousand_sockets_on_an_evicted_object(tmp_path: Path) -> None:
    project = cf_project(tmp_path, CHAT, CONFIG)
    with DevServer(project, "--object-idle-timeout", IDLE, "--no-access-log") as server:
        url = server.url.replace("http", "ws")
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            first = await session.ws_connect(url + "/?room=red")
            assert await ask(first, "count") == "1 1 built 1"
            before = server.rss_kib()
            sockets = [first]
            for start in range(0, 999, 100):
                count = min(100, 999 - start)
                batch = [session.ws_connect(url + "/?room=blue") for _ in range(count)]
                sockets += await asyncio.gather(*batch)
            after = server.rss_kib()
            # Rebuilt after an eviction while all 1,000 sockets stayed open.
            answer = await wait_for_rebuild(first, 1)
            assert re.fullmatch(r"1000 1 built [2-9]\d*", answer), answer
            await first.send_str("broadcast")
            received = await asyncio.gather(*(ws.receive_str() for ws in sockets))
            assert received == ["hello all"] * 1000
            per_socket = (after - before) * 1024 / 999
            print(f"\nmemory per idle hibernated WebSocket: {per_socket / 1024:.1f} KiB")
            await asyncio.gather(*(ws.close() for ws in sockets))
