"""Cloudflare's WebSocket Hibernation API for Durable Objects.

``ctx.acceptWebSocket(server, tags)`` hands the server end of a ``WebSocketPair`` to the
runtime: its messages are delivered to the object's ``webSocketMessage(ws, message)``,
its close to ``webSocketClose(ws, code, reason, was_clean)`` and failures to
``webSocketError(ws, error)``, each as a call through the object's namespace. The socket
no longer pins the object in memory: once idle, the object is evicted while the socket
stays open, and the next message rebuilds it (its constructor runs again);
``ctx.getWebSockets(tag)`` then finds the same sockets, and ``ws.deserializeAttachment()``
what ``ws.serializeAttachment(value)`` stored before eviction.
``ctx.setWebSocketAutoResponse(WebSocketRequestResponsePair(request, response))`` answers
a matching message without waking the object.

Sockets come from ``js.WebSocketPair.new()`` (``CloudflareWebSocket``): ``ws.send(data)``
and ``ws.close(code, reason)`` work without ``await``, as on Cloudflare (awaiting them is
fine too). Accepted sockets are owned by ``HIBERNATION``, which the app stops on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any

from dockyard.errors import MethodNotFound
from dockyard.http import WebSocket

from .clone import clone

__all__ = [
    "HIBERNATION",
    "CloudflareWebSocket",
    "Hibernation",
    "WebSocketRequestResponsePair",
    "websocket_pair",
]

log = logging.getLogger("dockyard.hibernation")
MAX_ATTACHMENT_BYTES = 16 * 1024  # Cloudflare's limit on a serialised attachment


class _Done:
    """What ``send``/``close`` return: already finished, and awaitable for those who await."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # makes this a generator


_DONE = _Done()


def _run_now(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (the in-process socket's send and close)."""
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value
    coroutine.close()
    raise RuntimeError("a WebSocket operation suspended; it was expected to finish at once")


class CloudflareWebSocket(WebSocket):
    """One end of ``js.WebSocketPair``, with Cloudflare's synchronous methods."""

    def __init__(self) -> None:
        super().__init__()
        self.attachment: Any = None
        self.tags: tuple[str, ...] = ()
        self.auto_response_at: float | None = None
        # Set when the runtime owns this end's peer: the object need not stay in memory.
        self.hibernatable = False
        self.peer: CloudflareWebSocket | None = None

    def send(self, data: str | bytes) -> Any:
        _run_now(super().send(data))
        return _DONE

    def close(self, code: int = 1000, reason: str = "") -> Any:
        _run_now(super().close(code, reason))
        return _DONE

    @property
    def readyState(self) -> int:  # Cloudflare's numbers: 1 open, 3 closed
        return 3 if self.closed else 1

    def serialize_attachment(self, value: Any) -> None:
        """Keep ``value`` (copied, at most 16 KiB) with the socket across hibernation."""
        copied = clone(value, "a WebSocket attachment")
        if len(repr(copied).encode()) > MAX_ATTACHMENT_BYTES:
            raise ValueError(
                f"a WebSocket attachment is limited to {MAX_ATTACHMENT_BYTES} bytes serialised"
            )
        self.attachment = copied

    def deserialize_attachment(self) -> Any:
        return clone(self.attachment, "a WebSocket attachment")

    serializeAttachment = serialize_attachment
    deserializeAttachment = deserialize_attachment


def websocket_pair() -> tuple[CloudflareWebSocket, CloudflareWebSocket]:
    """Two linked ends, as ``dockyard.http.WebSocketPair`` links its own."""
    client, server = CloudflareWebSocket(), CloudflareWebSocket()
    client._peer, server._peer = server, client
    client.peer, server.peer = server, client
    return client, server


@dataclass(frozen=True)
class WebSocketRequestResponsePair:
    """``setWebSocketAutoResponse(pair)``: a message equal to ``request`` gets ``response``."""

    request: str
    response: str

    @classmethod
    def new(cls, request: str, response: str) -> WebSocketRequestResponsePair:
        return cls(request, response)


@dataclass
class _ObjectSockets:
    sockets: list[CloudflareWebSocket] = field(default_factory=list)
    auto_response: WebSocketRequestResponsePair | None = None


class Hibernation:
    """Every accepted socket of this process, by object, and the tasks that read them."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], _ObjectSockets] = {}
        self._readers: set[asyncio.Task[None]] = set()

    def sockets(self, class_name: str, id_hex: str, tag: str | None = None) -> list[Any]:
        entry = self._objects.get((class_name, id_hex))
        if entry is None:
            return []
        return [s for s in entry.sockets if not s.closed and (tag is None or tag in s.tags)]

    def count(self) -> int:
        return sum(len(e.sockets) for e in self._objects.values())

    def set_auto_response(
        self, class_name: str, id_hex: str, pair: WebSocketRequestResponsePair | None
    ) -> None:
        self._objects.setdefault((class_name, id_hex), _ObjectSockets()).auto_response = pair

    def auto_response(self, class_name: str, id_hex: str) -> WebSocketRequestResponsePair | None:
        entry = self._objects.get((class_name, id_hex))
        return None if entry is None else entry.auto_response

    def accept(self, ws: Any, tags: list[str], namespace: Any, object_id: Any) -> None:
        if not isinstance(ws, CloudflareWebSocket):
            raise TypeError(
                "acceptWebSocket() takes an end of js.WebSocketPair.new() "
                f"(got {type(ws).__name__})"
            )
        if len(tags) > 10 or any(not isinstance(t, str) or len(t) > 256 for t in tags):
            raise ValueError("a WebSocket takes at most 10 tags of at most 256 characters")
        ws.accepted = True
        ws.tags = tuple(tags)
        if ws.peer is not None:
            ws.peer.hibernatable = True
        key = (namespace.class_name, object_id.hex)
        self._objects.setdefault(key, _ObjectSockets()).sockets.append(ws)
        task = asyncio.get_running_loop().create_task(self._read(ws, key, namespace, object_id))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _read(
        self, ws: CloudflareWebSocket, key: tuple[str, str], namespace: Any, object_id: Any
    ) -> None:
        stub = namespace.get(object_id)
        try:
            while True:
                message = await ws.receive()
                if message.type == "close":
                    code = message.code if message.code is not None else 1005
                    await self._deliver(stub, "webSocketClose", ws, code, message.reason, True)
                    return
                pair = self.auto_response(*key)
                if pair is not None and message.data == pair.request:
                    ws.auto_response_at = time.time() * 1000
                    ws.send(pair.response)
                    continue
                await self._deliver(stub, "webSocketMessage", ws, message.data)
        finally:
            entry = self._objects.get(key)
            if entry is not None and ws in entry.sockets:
                entry.sockets.remove(ws)
                if not entry.sockets and entry.auto_response is None:
                    del self._objects[key]

    async def _deliver(self, stub: Any, handler: str, ws: Any, *args: Any) -> None:
        try:
            await getattr(stub, handler)(ws, *args)
        except Exception as error:
            if handler == "webSocketError":
                log.exception("webSocketError() failed")
                return
            if isinstance(error, MethodNotFound):
                return  # the class does not handle this event
            log.warning("%s() failed: %r", handler, error)
            try:
                await stub.webSocketError(ws, error)
            except Exception:
                log.debug("no webSocketError() handler", exc_info=True)

    async def stop(self) -> None:
        """Close every accepted socket and end the readers (the app is shutting down)."""
        for entry in self._objects.values():
            for ws in entry.sockets:
                if not ws.closed:
                    ws.close(1001, "going away")
        readers = list(self._readers)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        self._objects.clear()


HIBERNATION = Hibernation()
