"""Fetch-style HTTP types: the only HTTP objects user code sees.

A body is ``None``, ``bytes``, ``str`` or an async iterable of ``bytes``. Iterable bodies
are streamed: nothing holds a whole body in memory unless the caller asks for it with
``await body.bytes()`` / ``text()`` / ``json()``. A body can be consumed once.

Over 400 lines: the fetch types, the one way header bytes go on the wire (shared by
the gateway and the container client) and the in-process WebSocket pair belong to the
same small vocabulary every layer speaks; splitting them would scatter it.
"""

from __future__ import annotations

import asyncio
import json as _json
import re
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import DockyardError, InvalidArgument, InvalidHeader

__all__ = [
    "BodyInit",
    "Headers",
    "HeadersInit",
    "Request",
    "Response",
    "WebSocket",
    "WebSocketMessage",
    "WebSocketPair",
    "error_response",
]

Headers = CIMultiDict
BodyInit = bytes | bytearray | memoryview | str | AsyncIterable[bytes] | None
HeadersInit = (
    Mapping[str, str] | Iterable[tuple[str, str]] | CIMultiDict[str] | CIMultiDictProxy[str] | None
)

STREAM_CHUNK = 64 * 1024
# Hop-by-hop headers (RFC 9110, 7.6.1): they describe one connection, so a proxy or a
# server sets its own and never copies these from the other side.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


# Header names and values are str holding one character per byte (latin-1), both ways:
# what arrives is decoded as latin-1 and what leaves is encoded as latin-1, so every byte
# a client sends reaches the container unchanged, and back (as aiohttp and uvicorn do).
#
# Header lines as they may go on the wire: a token for the name (RFC 9110, 5.1) and a
# value of visible characters, spaces and tabs (5.5): no CR, LF, NUL or other control,
# nothing beyond latin-1. Names are few and repeat, so each is checked once and
# remembered; values are checked by one precompiled pattern over the whole block, once
# per message, which costs less than a check per header.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_BLOCK = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [\t\x20-\x7e\x80-\xff]*\r\n)*")
_HEADER_LINE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [\t\x20-\x7e\x80-\xff]*")
GOOD_HEADER_NAMES: set[str] = set()


def check_header_name(name: str) -> None:
    """Raise ``InvalidHeader`` unless ``name`` is a token."""
    if name not in GOOD_HEADER_NAMES:
        if _TOKEN.fullmatch(name) is None:
            raise InvalidHeader(f"invalid header name {name[:200]!r}")
        if len(GOOD_HEADER_NAMES) < 4096:
            GOOD_HEADER_NAMES.add(name)


def encode_header_block(block: str, lines: int) -> bytes:
    """``lines`` ``"Name: value\\r\\n"`` lines (names checked) as bytes, or ``InvalidHeader``."""
    # The count catches a value holding a whole extra line ("a\\r\\nInjected: 1").
    if _HEADER_BLOCK.fullmatch(block) is None or block.count("\n") != lines:
        for line in block.split("\r\n")[:-1]:
            if _HEADER_LINE.fullmatch(line) is None:
                raise InvalidHeader(f"invalid header line {line[:200]!r}")
        raise InvalidHeader(f"a header value holds a line break: {block[:200]!r}")
    return block.encode("latin-1")


def make_headers(init: HeadersInit) -> CIMultiDict[str]:
    if init is None:
        return CIMultiDict()
    if isinstance(init, CIMultiDict | CIMultiDictProxy):
        return CIMultiDict(init)
    if isinstance(init, Mapping):
        return CIMultiDict((str(k), str(v)) for k, v in init.items())
    return CIMultiDict((str(k), str(v)) for k, v in init)


class BodyUsed(RuntimeError):
    """A body was read twice."""


class _Body:
    """Body handling shared by requests and responses."""

    headers: CIMultiDict[str]

    def _init_body(self, body: BodyInit) -> None:
        self._body_used = False
        if isinstance(body, str):
            self._body: bytes | AsyncIterable[bytes] | None = body.encode()
            self.headers.setdefault("content-type", "text/plain;charset=UTF-8")  # as Cloudflare
        elif isinstance(body, bytearray | memoryview):
            self._body = bytes(body)
        else:
            self._body = body

    @property
    def body_used(self) -> bool:
        return self._body_used

    @property
    def has_body(self) -> bool:
        return self._body is not None

    @property
    def body_length(self) -> int | None:
        """Length when the body is held in memory, None when it is a stream."""
        if self._body is None:
            return 0
        if isinstance(self._body, bytes):
            return len(self._body)
        return None

    def stream(self) -> BodyStream:
        """The body as an async iterator of chunks, consumed once."""
        if self._body_used:
            raise BodyUsed("body already read")
        self._body_used = True
        return BodyStream(self._body)

    async def discard(self) -> None:
        """Give up a body that will not be read, so its source can release what it holds."""
        if not self._body_used:
            self._body_used = True
            await _close_source(self._body)

    async def bytes(self) -> bytes:
        if isinstance(self._body, bytes) and not self._body_used:
            self._body_used = True
            return self._body
        return b"".join([chunk async for chunk in self.stream()])

    async def text(self) -> str:
        return (await self.bytes()).decode()

    async def json(self) -> Any:
        return _json.loads(await self.bytes())


class BodyStream:
    """A body's chunks, read once; ``aclose()`` closes the source, read from or not.

    Not an async generator: closing a generator that never started skips its
    ``finally``, and a source left open can hold a container's request in flight.
    """

    __slots__ = ("_body", "_closed", "_iterator")

    def __init__(self, body: bytes | AsyncIterable[bytes] | None) -> None:
        self._body = body
        self._iterator: AsyncIterator[bytes] | None = None
        self._closed = False

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        body = self._body
        if self._closed or body is None:
            raise StopAsyncIteration
        if isinstance(body, bytes):
            self._closed = True
            if body:
                return body
            raise StopAsyncIteration
        iterator = self._iterator
        if iterator is None:
            iterator = self._iterator = aiter(body)
        try:
            while True:
                chunk = await anext(iterator)
                if chunk:
                    return bytes(chunk)
        except StopAsyncIteration:
            await self.aclose()
            raise
        except BaseException:
            # Stopped early (an error, a cancellation): the source cleans up now, not at GC.
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                if self._iterator is not None and self._iterator is not self._body:
                    await _close_source(self._iterator)
            finally:
                await _close_source(self._body)


async def _close_source(body: object) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


class Request(_Body):
    """An HTTP request: ``Request(url, method=..., headers=..., body=...)``.

    ``Request(other, ...)`` copies ``other`` (taking over its body stream), with
    keyword arguments overriding its fields, as ``new Request(request, init)`` does.
    """

    def __init__(
        self,
        input: str | URL | Request,
        *,
        method: str | None = None,
        headers: HeadersInit = None,
        body: BodyInit = None,
    ) -> None:
        self.url: str
        self.method: str
        if isinstance(input, Request):
            self.url = input.url
            self.method = (method or input.method).upper()
            self.headers = make_headers(headers if headers is not None else input.headers)
            if body is None and input._body is not None and not input._body_used:
                body = input._body
                input._body_used = True
        else:
            self.url = str(input)
            self.method = (method or "GET").upper()
            self.headers = make_headers(headers)
        self._init_body(body)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.url}>"

    # ``url`` parsed, with the string it was parsed from (see ``parsed_url``).
    _parsed: tuple[str, URL] | None = None

    @property
    def path(self) -> str:
        return parsed_url(self).path

    @property
    def query(self) -> Mapping[str, str]:
        return parsed_url(self).query

    @property
    def query_string(self) -> str:
        return parsed_url(self).query_string

    @property
    def is_websocket(self) -> bool:
        return self.headers.get("upgrade", "").lower() == "websocket"


def parsed_url(request: Request) -> URL:
    """``request.url`` as a ``yarl.URL``, parsed once per value of ``url``.

    A request's path is asked for several times on its way (the worker, static assets,
    the proxy); ``url`` may be reassigned, and is then parsed again.
    """
    url = request.url
    parsed = request._parsed
    if parsed is not None and parsed[0] is url:
        return parsed[1]
    value = URL(url)
    request._parsed = (url, value)
    return value


class _class_or_instance:
    """``Response.json(obj)`` constructs (as in fetch); ``await response.json()`` reads."""

    def __init__(self, constructor: Any) -> None:
        self._constructor = constructor

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self._constructor.__get__(owner, owner)
        return _Body.json.__get__(instance, owner)


class Response(_Body):
    """An HTTP response, or with ``web_socket`` the client end of an accepted WebSocket."""

    def __init__(
        self,
        body: BodyInit = None,
        *,
        status: int = 200,
        headers: HeadersInit = None,
        web_socket: WebSocket | None = None,
    ) -> None:
        if not 100 <= status <= 599:
            raise InvalidArgument(f"Response status must be between 100 and 599, got {status}")
        self.status = status
        self.headers = make_headers(headers)
        self.web_socket = web_socket
        self._init_body(body)

    def __repr__(self) -> str:
        return f"<Response {self.status}>"

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @_class_or_instance
    def json(
        cls: type[Response], data: Any, *, status: int = 200, headers: HeadersInit = None
    ) -> Response:
        """``Response.json(obj)`` builds a JSON response; ``await response.json()`` reads one."""
        response = cls(_json.dumps(data).encode(), status=status, headers=headers)
        response.headers["content-type"] = "application/json"
        return response

    @classmethod
    def redirect(cls, url: str, status: int = 302) -> Response:
        if status not in (301, 302, 303, 307, 308):
            raise InvalidArgument(
                f"redirect status must be 301, 302, 303, 307 or 308, got {status}"
            )
        return cls(None, status=status, headers={"location": url})


@dataclass(frozen=True, slots=True)
class WebSocketMessage:
    type: Literal["text", "binary", "close"]
    data: str | bytes | None = None
    code: int | None = None
    reason: str = ""


class WebSocketClosed(RuntimeError):
    """Sending on a closed WebSocket."""


# Messages one end holds for a reader that has not taken them; a sender waits beyond
# this, so a fast sender cannot outgrow a slow reader (each message is bounded by the
# gateway's ``websocket_max_message``).
WEBSOCKET_QUEUE = 16


class WebSocket:
    """One end of an in-process WebSocket pair.

    The gateway bridges the client's real connection to one end; user code (or the
    Container class) holds the other. Messages sent on one end arrive at the other.
    ``send`` waits while the other end holds ``WEBSOCKET_QUEUE`` unread messages; a
    close is never held back.
    """

    def __init__(self, max_queue: int = WEBSOCKET_QUEUE) -> None:
        self._inbox: deque[WebSocketMessage] = deque()
        self._max_queue = max_queue
        self._reader: asyncio.Future[None] | None = None
        self._writers: deque[asyncio.Future[None]] = deque()
        self._peer: WebSocket | None = None
        self.accepted = False
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        self._closed_event = asyncio.Event()

    def accept(self) -> None:
        self.accepted = True

    async def send(self, data: str | bytes) -> None:
        peer = self._peer
        if self.closed or peer is None:
            raise WebSocketClosed("WebSocket is closed")
        while len(peer._inbox) >= peer._max_queue and not peer.closed and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            peer._writers.append(waiter)
            try:
                await waiter
            finally:
                if waiter in peer._writers:
                    peer._writers.remove(waiter)
        if self.closed:
            raise WebSocketClosed("WebSocket is closed")
        if peer.closed:
            return  # the other end hung up; its close is on its way to this end
        kind: Literal["text", "binary"] = "text" if isinstance(data, str) else "binary"
        peer._deliver(WebSocketMessage(kind, data))

    async def receive(self) -> WebSocketMessage:
        while not self._inbox:
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        message = self._inbox.popleft()
        self._wake_writer()
        if message.type == "close":
            self._mark_closed(message.code, message.reason)
        return message

    def _deliver(self, message: WebSocketMessage) -> None:
        self._inbox.append(message)
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _wake_writer(self) -> None:
        while self._writers:
            waiter = self._writers.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _mark_closed(self, code: int | None, reason: str) -> None:
        self.closed = True
        self.close_code = code
        self.close_reason = reason
        self._closed_event.set()
        # Senders waiting for room here, or on the other end, look again and give up.
        for end in (self, self._peer):
            if end is not None:
                while end._writers:
                    waiter = end._writers.popleft()
                    if not waiter.done():
                        waiter.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until this end has sent or received a close."""
        await self._closed_event.wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self._mark_closed(code, reason)
        if self._peer is not None and not self._peer.closed:
            self._peer._deliver(WebSocketMessage("close", None, code, reason))

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str | bytes]:
        while True:
            message = await self.receive()
            if message.type == "close":
                return
            assert message.data is not None
            yield message.data


def WebSocketPair() -> tuple[WebSocket, WebSocket]:
    """Two linked WebSocket ends: ``client, server = WebSocketPair()``."""
    client, server = WebSocket(), WebSocket()
    client._peer, server._peer = server, client
    return client, server


def error_response(
    error: DockyardError, ident: str, *, debug: bool = False, prefix: str | None = None
) -> Response:
    """What a client sees of ``error``: its public message and the id that ties it to the
    log line with the details (the details themselves only with ``debug``)."""
    text = str(error) if debug else error.public
    if prefix:
        text = f"{prefix}: {text}"
    return Response(f"{text} (error id {ident})\n", status=error.status)
