"""The node's registry proxy (token auth in front of ``docker-registry``) served on
127.0.0.1 the way the admin listener mounts it, for registry tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from dockyard.node.registry import Registry, registry_proxy


@asynccontextmanager
async def serving_proxy(
    registry: Registry, scope: Callable[[str], str | None]
) -> AsyncIterator[str]:
    """``registry``'s proxy on 127.0.0.1, ``scope(token)`` naming a token's scope; yields
    its host:port."""
    app = web.Application()
    app.router.add_route("*", "/v2/{tail:.*}", registry_proxy(registry, scope))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert runner.addresses
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
