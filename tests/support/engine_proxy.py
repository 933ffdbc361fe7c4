"""A cuttable stand-in for the engine's socket, for engine-outage tests.

`EngineSocketProxy` is a unix socket the test owns that forwards byte for byte to the
real engine's; cutting it closes every connection and refuses new ones, as a restarting
or crashed dockerd does. A runtime (or a `dockyard dev` through `DOCKER_HOST`) pointed
at `proxy.url` sees the outage; the test's own runtime, on the real socket, does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

ENGINE_SOCKET = Path("/var/run/docker.sock")


class EngineSocketProxy:
    """A unix socket forwarding byte for byte to the engine's; `cut()` and `restore()`."""

    def __init__(self, path: Path, target: Path = ENGINE_SOCKET) -> None:
        self.path = path
        self.target = target
        # Every byte a client sent, so a test can wait until a request reached the engine.
        self.sent = bytearray()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Cleared by `stall()`: connections stay open but nothing is passed on.
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stall_marker: bytes | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    async def restore(self) -> None:
        self._flowing.set()
        if self._server is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))

    def stall(self) -> None:
        """Keep accepting, answer nothing (a wedged engine)."""
        self._flowing.clear()

    def stall_on(self, marker: bytes) -> None:
        """Pass everything on until a client sends ``marker``; from that request on, as
        `stall()` (the engine wedges in the middle of a start, say)."""
        self._stall_marker = marker

    async def cut(self) -> None:
        """Refuse new connections and drop every open one (the engine went away)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for writer in list(self._writers):
            writer.transport.abort()

    async def aclose(self) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.target))
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer, record=True)),
            asyncio.create_task(self._pipe(up_reader, writer, record=False)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._tasks.difference_update(pipes)
            self._writers.difference_update((writer, up_writer))
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, record: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if record and self._stall_marker is not None and self._stall_marker in data:
                    self._stall_marker = None
                    self._flowing.clear()
                await self._flowing.wait()
                if record:
                    self.sent += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            # One side ended: the whole connection ends, as a dying engine's would.
            writer.transport.abort()


@contextlib.asynccontextmanager
async def open_engine_proxy() -> AsyncIterator[EngineSocketProxy]:
    """A proxy to the real engine, listening until the block ends (skips the test where
    the engine's socket is not usable)."""
    if not os.access(ENGINE_SOCKET, os.R_OK | os.W_OK):
        pytest.skip(f"the outage tests forward to {ENGINE_SOCKET}, which is not usable here")
    # A short folder of its own: a unix socket path must fit in 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="dy-engine-"))
    proxy = EngineSocketProxy(folder / "engine.sock")
    try:
        await proxy.restore()
        yield proxy
    finally:
        await proxy.aclose()
        shutil.rmtree(folder, ignore_errors=True)
