"""Client-side timing: first HTTP response from a port, and timed requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import aiohttp

__all__ = ["bounded", "first_response", "timed_get"]

T = TypeVar("T")

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


async def bounded(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """``awaitable``, or TimeoutError saying what did not happen within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError:
        raise TimeoutError(f"{what} within {seconds:g} s") from None


async def first_response(port: int) -> None:
    """Poll 127.0.0.1:``port`` in a tight loop until an HTTP status line comes back.

    A published port accepts connections before the container listens (docker-proxy
    closes them at once), so only a status line counts as an answer. Bound it with a
    timeout.
    """
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(REQUEST)
                line = await reader.readline()
            finally:
                writer.close()
            if line.startswith(b"HTTP/"):
                return
        except OSError:
            pass
        await asyncio.sleep(0.001)


async def timed_get(session: aiohttp.ClientSession, url: str) -> tuple[int | None, float]:
    """(status, milliseconds) of one GET with its body read; status None if it failed."""
    started = time.perf_counter()
    try:
        async with session.get(url) as response:
            await response.read()
            status: int | None = response.status
    except (aiohttp.ClientError, TimeoutError):
        status = None
    return status, (time.perf_counter() - started) * 1000
