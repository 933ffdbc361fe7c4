"""Durable Objects written for Cloudflare: camelCase names, ctx helpers and RPC copies."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.compat import cf_project, request
from tests.support.devserver import DevServer

OBJECTS = """
import asyncio
import json

from workers import DurableObject, Response, WorkerEntrypoint


class Counter(DurableObject):
    block_concurrency_limit = 0.3  # Cloudflare's is 30 s; lowered so the test is quick

    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        self.items = []
        self.loaded = None
        ctx.blockConcurrencyWhile(self.load)  # a coroutine function, not awaited

    async def load(self):
        await asyncio.sleep(0)
        self.loaded = (await self.ctx.storage.get("boot") or 0) + 1
        await self.ctx.storage.put("boot", self.loaded)

    async def fetch(self):
        return Response(f"boot {self.loaded}")

    def remember(self, items):
        self.items.append(items)
        return self.items

    def snapshot(self):
        return self.items

    async def hang(self):
        # Never finishes: Cloudflare's limit resets the object.
        self.ctx.blockConcurrencyWhile(lambda: asyncio.Event().wait())
        return "blocked"

    def sync_block(self):
        self.ctx.blockConcurrencyWhile(lambda: self.items.append(["sync"]))
        return "ok"

    async def later(self):
        async def work():
            await self.ctx.storage.put("later", "done")
        self.ctx.waitUntil(work())
        return "scheduled"

    async def read(self, key):
        return await self.ctx.storage.get(key)


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        ns = self.env.COUNTER
        path = request.path
        if path == "/ids":
            named = ns.idFromName("a")
            unique = ns.newUniqueId()
            back = ns.idFromString(str(unique))
            same = ns.getByName("a").id == ns.get(named, locationHint="weur").id
            return Response.json([str(named) == str(ns.id_from_name("a")), back == unique, same])
        stub = ns.getByName("a")
        if path == "/fetch":
            return await stub.fetch(request)
        if path == "/copies":
            mine = ["x"]
            returned = await stub.remember(mine)
            mine.append("changed after the call")
            returned.append("changed the result")
            return Response.json(await stub.snapshot())
        if path == "/uncopyable":
            try:
                await stub.remember(lambda: 1)
            except TypeError as exc:
                return Response(str(exc), status=400)
            return Response("accepted")
        if path == "/hang":
            await stub.hang()
            try:
                await stub.snapshot()
            except Exception as exc:
                return Response(type(exc).__name__, status=500)
            return Response("not reset")
        if path == "/sync-block":
            await stub.sync_block()
            return Response.json(await stub.snapshot())
        if path == "/later":
            await stub.later()
            for _ in range(200):
                if await stub.read("later") == "done":
                    return Response("done")
                await asyncio.sleep(0.01)
            return Response("never ran", status=500)
        return Response("?", status=404)
"""

CONFIG = {
    "durable_objects": {"bindings": [{"name": "COUNTER", "class_name": "Counter"}]},
    "migrations": [{"tag": "v1", "new_sqlite_classes": ["Counter"]}],
}


async def test_namespace_camel_case_names(tmp_path: Path) -> None:
    with DevServer(cf_project(tmp_path, OBJECTS, CONFIG)) as server:
        status, _, body, _ = await request(server.url + "/ids")
        assert (status, json.loads(body)) == (200, [True, True, True])


async def test_block_concurrency_while_takes_a_callable_and_fetch_takes_no_request(
    tmp_path: Path,
) -> None:
    with DevServer(cf_project(tmp_path, OBJECTS, CONFIG)) as server:
        # The constructor's blockConcurrencyWhile(self.load) ran before fetch was let in.
        assert (await request(server.url + "/fetch"))[:3] == (
            200,
            "text/plain;charset=UTF-8",
            b"boot 1",
        )
        status, _, body, _ = await request(server.url + "/sync-block")
        assert (status, json.loads(body)) == (200, [["sync"]])


async def test_block_concurrency_limit_resets_the_object(tmp_path: Path) -> None:
    with DevServer(cf_project(tmp_path, OBJECTS, CONFIG)) as server:
        await request(server.url + "/copies")
        assert (await request(server.url + "/hang"))[:3] == (
            500,
            "text/plain;charset=UTF-8",
            b"ObjectReset",
        )
        # A fresh instance: memory is gone, storage stays (boot counted twice).
        assert (await request(server.url + "/fetch"))[2] == b"boot 2"


async def test_wait_until_in_an_object(tmp_path: Path) -> None:
    with DevServer(cf_project(tmp_path, OBJECTS, CONFIG)) as server:
        assert (await request(server.url + "/later"))[:3] == (
            200,
            "text/plain;charset=UTF-8",
            b"done",
        )


async def test_rpc_arguments_and_results_are_copies(tmp_path: Path) -> None:
    with DevServer(cf_project(tmp_path, OBJECTS, CONFIG)) as server:
        status, kind, body, _ = await request(server.url + "/copies")
        # Neither the caller's later change to its argument nor to the result reached
        # the object's state.
        assert (status, kind, json.loads(body)) == (200, "application/json", [["x"]])
        status, _, body, _ = await request(server.url + "/uncopyable")
        assert status == 400
        assert body == (
            b"argument 1 of Counter.remember() is a function, which cannot be sent "
            b"over RPC: send str, int, float, bool, None, bytes, list, tuple, dict, set, "
            b"datetime, a dataclass, a Request/Response, or a stub"
        )
