"""Small task helpers shared by the gateway and the container proxy."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def until_first_done(*coros: Coroutine[Any, Any, None]) -> None:
    """Run ``coros`` together until one of them ends, then cancel and await the rest.

    A WebSocket bridge pumps each direction in its own coroutine; whichever side ends
    first (a close, an error) ends the bridge.
    """
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
