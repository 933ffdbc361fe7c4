"""Flow control shared by the gateway's server protocol and the container client.

``WriteFlow`` lets a writer wait while the transport's buffer is full. ``ChunkBuffer``
holds body chunks that arrive from a socket until a coroutine reads them, and pauses
reading from that socket while too much is waiting. ``SendBatch`` writes what the
connections sent during one pass of the event loop together, at its end.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Protocol

from .errors import error_id

__all__ = ["BATCHED_MAX", "ChunkBuffer", "SendBatch", "WriteFlow", "send_batch"]

log = logging.getLogger("dockyard.gateway")

HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10


# Sends larger than this are written at once: batching them saves nothing worth a copy.
BATCHED_MAX = 64 << 10


class Batched(Protocol):
    def send_unsent(self) -> None: ...


class SendBatch:
    """Sends made during one pass of the event loop, written together at its end.

    A send to a peer that waits for it wakes the peer, and on a virtual machine a wake-up
    is dear (an interrupt to another CPU, an exit to the hypervisor). Writing each answer
    as soon as it is made woke the container, and wrk, once per request; written together
    at the end of the pass, a burst of requests wakes each peer once. At 64 connections
    this cut Dockyard's CPU per warm request by about a fifth (README, "Performance").

    A sender keeps its unsent bytes itself and sends them in ``send_unsent()``, which it
    also calls before any other write or close of its transport, so order is kept. A
    sender with no other request in the making writes at once: nothing could share the
    batch, and keeping the bytes to the end of the pass cost about 15% of the requests a
    second at one connection.
    """

    __slots__ = ("_loop", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: list[Batched] = []

    def add(self, sender: Batched) -> None:
        """``sender.send_unsent()`` runs at the end of this pass of the loop."""
        if not self._waiting:
            self._loop.call_soon(self._send)
        self._waiting.append(sender)

    def _send(self) -> None:
        waiting, self._waiting = self._waiting, []
        for sender in waiting:
            try:
                sender.send_unsent()
            except Exception as exc:
                # (a bug: senders check their transport) The others must still go out.
                log.error("A send failed (error id %s): %r", error_id(), exc, exc_info=exc)


_BATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SendBatch] = (
    weakref.WeakKeyDictionary()
)


def send_batch(loop: asyncio.AbstractEventLoop) -> SendBatch:
    """The one ``SendBatch`` of ``loop``: the gateway's connections and the container
    client's share it, so a pass of the loop ends with one call that sends for all."""
    batch = _BATCHES.get(loop)
    if batch is None:
        batch = _BATCHES[loop] = SendBatch(loop)
    return batch


class WriteFlow:
    """Mixed into an ``asyncio.Protocol``: ``await drain()`` while writing is paused.

    With ``_write_timeout`` set, a drain that waits longer raises ``TimeoutError``: a
    peer that stops reading cannot hold a writer (and what it buffers) forever.
    """

    _can_write = True
    _drained: asyncio.Future[None] | None = None
    _write_timeout: float | None = None

    def pause_writing(self) -> None:
        self._can_write = False

    def resume_writing(self) -> None:
        self._can_write = True
        self._release_writer()

    async def drain(self) -> None:
        if not self._can_write:
            self._drained = asyncio.get_running_loop().create_future()
            if self._write_timeout is None:
                await self._drained
            else:
                async with asyncio.timeout(self._write_timeout):
                    await self._drained

    async def send_body(
        self,
        transport: asyncio.WriteTransport,
        chunks: AsyncIterable[bytes],
        *,
        chunked: bool,
        closed: Callable[[], bool],
    ) -> None:
        """Write a streamed HTTP/1.1 body, chunk-encoded or raw, waiting while paused.

        Stops early once ``closed()`` says the connection is gone.
        """
        async for chunk in chunks:
            if closed():
                return
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            await self.drain()
        if chunked and not closed():
            transport.write(b"0\r\n\r\n")

    def _release_writer(self) -> None:
        """Wake a waiting writer (also when the connection is lost: it checks for that)."""
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)


class ChunkBuffer:
    """Chunks fed by a protocol, read once by a coroutine, with read-side back pressure."""

    def __init__(
        self,
        pause_reading: Callable[[], None],
        resume_reading: Callable[[], None],
        *,
        high_water: int = HIGH_WATER,
        low_water: int = LOW_WATER,
    ) -> None:
        self._pause_reading = pause_reading
        self._resume_reading = resume_reading
        self._high_water = high_water
        self._low_water = low_water
        self._chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.error: Exception | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self.buffered += len(data)
        if self.buffered > self._high_water and not self._paused:
            self._paused = True
            self._pause_reading()
        self._wake()

    def finish(self, error: Exception | None = None) -> None:
        """The end of the body; with ``error``, readers get it once the chunks run out."""
        if not self.complete:
            self.complete = True
            self.error = error
            self._wake()

    async def next_chunk(self) -> bytes | None:
        """The next chunk, or None at the end of the body."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        chunk = self._chunks.popleft()
        self.buffered -= len(chunk)
        if self._paused and self.buffered < self._low_water:
            self._paused = False
            self._resume_reading()
        return chunk

    def take_all(self) -> bytes | None:
        """The whole body at once if it has all arrived without error, else None."""
        if not self.complete or self.error is not None:
            return None
        chunks = self._chunks
        whole = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused:
            self._paused = False
            self._resume_reading()
        return whole

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self.next_chunk()) is not None:
            yield chunk

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
