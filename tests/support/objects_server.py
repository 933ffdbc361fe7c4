"""An ObjectHost behind a minimal aiohttp server, for tests that kill real processes.

Usage: python objects_server.py STATE_DIR. Prints ``PORT <n>`` once it listens on
127.0.0.1, then serves until killed.

    POST /put/{name}/{key}   body = value; 200 only after storage.put returned
    GET  /get/{name}/{key}   the value (404 if absent)
    GET  /keys/{name}        JSON list of keys
    POST /alarm/{name}?at=ms set the object's alarm
    GET  /alarms/{name}      JSON {"fired": n, "alarm": ms | null}
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from dockyard.objects import AlarmInfo, DurableObject, ObjectHost


class Store(DurableObject):
    async def put(self, key: str, value: str) -> None:
        await self.ctx.storage.put(key, value)

    async def get(self, key: str) -> Any:
        return await self.ctx.storage.get(key)

    async def keys(self) -> list[str]:
        return list(await self.ctx.storage.list())

    async def schedule(self, at: float) -> None:
        await self.ctx.storage.set_alarm(at)

    async def alarms(self) -> dict[str, Any]:
        fired = self.ctx.storage.kv.get("_fired") or 0
        return {"fired": fired, "alarm": await self.ctx.storage.get_alarm()}

    async def alarm(self, info: AlarmInfo) -> None:
        fired = await self.ctx.storage.get("_fired") or 0
        await self.ctx.storage.put("_fired", fired + 1)


async def main(state_dir: Path) -> None:
    host = ObjectHost(state_dir, app="server-test", idle_timeout=5.0)
    host.set_class("Store", Store)
    stores = host.namespace("Store")

    async def put(request: web.Request) -> web.Response:
        stub = stores.get_by_name(request.match_info["name"])
        await stub.put(request.match_info["key"], await request.text())
        return web.Response(text="ok")

    async def get(request: web.Request) -> web.Response:
        value = await stores.get_by_name(request.match_info["name"]).get(request.match_info["key"])
        if value is None:
            return web.Response(status=404)
        return web.Response(text=value)

    async def keys(request: web.Request) -> web.Response:
        return web.json_response(await stores.get_by_name(request.match_info["name"]).keys())

    async def set_alarm(request: web.Request) -> web.Response:
        stub = stores.get_by_name(request.match_info["name"])
        await stub.schedule(float(request.query["at"]))
        return web.Response(text="ok")

    async def alarms(request: web.Request) -> web.Response:
        return web.json_response(await stores.get_by_name(request.match_info["name"]).alarms())

    app = web.Application()
    app.add_routes(
        [
            web.post("/put/{name}/{key}", put),
            web.get("/get/{name}/{key}", get),
            web.get("/keys/{name}", keys),
            web.post("/alarm/{name}", set_alarm),
            web.get("/alarms/{name}", alarms),
        ]
    )
    async with host:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        port = server.sockets[0].getsockname()[1]
        print(f"PORT {port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
