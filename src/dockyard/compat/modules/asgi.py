"""Cloudflare's top-level ``asgi`` module, provided by Dockyard (see dockyard.compat.asgi)."""

from typing import Any

from dockyard.compat.asgi import fetch

__all__ = ["fetch"]  # and `env`, made on first use (it needs FastAPI)


def __getattr__(name: str) -> Any:
    # `asgi.env`: a FastAPI dependency giving the worker's env, as Cloudflare's module has.
    if name == "env":
        from fastapi import Depends
        from fastapi import Request as FastAPIRequest

        async def env(request: FastAPIRequest) -> Any:
            return request.scope["env"]

        return Depends(env)
    raise AttributeError(f"module 'asgi' has no attribute {name!r}")
