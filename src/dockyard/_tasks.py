"""Small task helpers shared by the gateway, the container proxy and the node's streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


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


async def until_closed(
    source: AsyncIterator[T], closing: asyncio.Event, *, idle: float | None = None
) -> AsyncIterator[T | None]:
    """The items of ``source`` until it ends or ``closing`` is set, and None whenever
    ``idle`` seconds pass without one (a stream's keep-alive). A long-lived response
    (a log tail, a followed container log) ends this way when its server stops, instead
    of holding the stop up until the server's shutdown timeout."""
    pending: asyncio.Task[T] | None = None
    closed = asyncio.ensure_future(closing.wait())
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait(
                {pending, closed}, timeout=idle, return_when=asyncio.FIRST_COMPLETED
            )
            if closed in done:
                return
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        for task in (pending, closed):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
