"""The gateway's HTTP/1.1 connection handler, on httptools.

aiohttp's server spends about twice as long per request as this loop (measured with wrk
on the same machine: 50k against 112k req/s for a fixed answer), and the gateway sees
every request. This handles plain HTTP/1.1: keep-alive, pipelining (answered in order),
request and response bodies streamed both ways with flow control, ``Expect:
100-continue``. A WebSocket upgrade is handed, with the connection, to aiohttp's server,
which does the WebSocket protocol (see ``Gateway``).

Hostile clients meet the limits of ``GatewayLimits``: the head's size, line length,
header count and URL length are bounded (431, 414), as are the requests parsed ahead,
the body bytes buffered, and the time a head, a body or a write may take. Whatever goes
wrong while answering ends in a response or in closing the connection; a response body
that was not sent to its end is always closed (its source may hold a container busy).

While other answers are in the making, a small answer is written at the end of the
event loop's pass together with theirs (``SendBatch``): each client wakes once a burst.

Over 400 lines: one connection's life (parsing, limits, answering, timers) reads best
in one place; the limits, the registry and header encoding live in their own modules.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools
from multidict import CIMultiDict
from yarl import URL

from .._flow import BATCHED_MAX, ChunkBuffer, SendBatch, WriteFlow
from ..errors import ClientError, InvalidHeader, RequestTimeout, error_id
from ..http import (
    GOOD_HEADER_NAMES,
    HOP_BY_HOP,
    Request,
    Response,
    check_header_name,
    encode_header_block,
)
from .connections import Connections, warn_limit
from .limits import GatewayLimits

__all__ = ["HttpProtocol"]

log = logging.getLogger("dockyard.gateway")

# What a Host header may hold: a name or IPv4 address, or a bracketed IPv6 address, and
# an optional port. Anything else could rewrite the request's URL, or fail to parse later.
_HOST = re.compile(r"(?:[A-Za-z0-9._\-]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?")
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_STATUS_LINES = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, text.encode()) for code, text in _REASONS.items()
}
_METHODS: dict[bytes, str] = {}

# Why reading from the client is paused (a bit each; reading resumes when none is left).
_BODY = 1  # the worker has not taken the body bytes already buffered
_PIPELINE = 2  # too many requests parsed ahead of the one being answered
_UPGRADE = 4  # waiting to hand the connection to the WebSocket server
# Reads longer than this are parsed a slice at a time (see data_received): what one
# slice can hold beyond ``max_pipelined`` (a few hundred minimal requests) is the bound.
_SLICE = 4 * 1024

Respond = Callable[[Request], Awaitable[Response]]
Upgrade = Callable[[asyncio.Transport, bytes, list[tuple[str, str]]], None]
# A request to answer (request, keep-alive, its body, whether it waits for a 100
# Continue in its turn), or a final error answer's bytes.
_Pending = tuple[Request, bool, ChunkBuffer | None, bool] | bytes


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Date:
    """The Date header, formatted once a second."""

    value = b""
    second = -1

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\n"
        return cls.value


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing; the answer is in ``_rejection``."""


class HttpProtocol(WriteFlow, asyncio.Protocol):
    """One client connection."""

    def __init__(
        self,
        respond: Respond,
        upgrade: Upgrade,
        connections: Connections[HttpProtocol],
        limits: GatewayLimits,
        batch: SendBatch,
    ) -> None:
        self._limits = limits
        self._batch = batch
        # Answers written in this pass of the loop, sent at its end (SendBatch).
        self._unsent = b""
        self._write_timeout = limits.write_timeout
        self._respond = respond
        self._upgrade = upgrade
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url_parts: list[bytes] = []
        self._url_length = 0
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._head_raw = 0
        self._in_head = False
        self._head_started = 0.0
        self._body: ChunkBuffer | None = None
        self._body_progress = 0.0
        # The body being read (only ever one) belongs to a request waiting for its turn to
        # be told "100 Continue": its client is not late sending it.
        self._continue_owed = False
        self._body_timer: asyncio.TimerHandle | None = None
        self._queue: deque[_Pending] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._streaming = False
        self._closed = False
        self._paused_for = 0
        self._rejection: bytes | None = None
        self._unparsed = b""
        self._discard = False
        self._body_left: int | None = None
        self._pending_upgrade: bytes | None = None
        # The head's and the lingering close's timer.
        self._timer: asyncio.TimerHandle | None = None
        # The keep-alive timer is lazy: a request does not cancel it, the end of an
        # answer moves _idle_since, and the timer arms itself again when it fires early.
        # One timer per idle period, not a cancel and a new one per request.
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._good_host = ""

    @property
    def idle(self) -> bool:
        return self._worker is None and not self._queue

    @property
    def in_flight(self) -> asyncio.Task[None] | None:
        """The task answering this connection's requests, if any."""
        return self._worker

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self._connections.add(self):
            self.transport.write(
                _simple_response(503, "Service Unavailable: too many connections\n")
            )
            self.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:  # (no Nagle on unix sockets)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        if self._discard:
            return  # after a malformed, over-limit or too slow request
        size = len(data)
        if size <= _SLICE:
            self._feed(data)
            return
        # The parser cannot stop between two messages of one feed, so a read full of
        # tiny pipelined requests is fed a slice at a time, and what is left waits while
        # too many requests are queued. Body bytes alone are fed in one piece.
        view = memoryview(data)
        offset = 0
        while offset < size:
            left = self._body_left
            step = size - offset if left is not None and left >= size - offset else _SLICE
            if not self._feed(view[offset : offset + step], view[offset + step :]):
                return
            offset += step
            if self._paused_for and offset < size and not self._discard:
                self._unparsed = data[offset:]  # fed again in _resume
                return

    def _feed(self, data: bytes | memoryview, rest: bytes | memoryview = b"") -> bool:
        """Parse ``data``; False if nothing more may be parsed on this connection."""
        in_head = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            self._begin_upgrade(bytes(data[offset:]) + bytes(rest))
            return False
        except httptools.HttpParserError:
            if self._rejection is None:
                self._rejection = _simple_response(400, "Bad Request: malformed HTTP\n")
            self._reject()
            return False
        if self._in_head and self._timer is None and not self._discard:
            self._timer = self._loop.call_at(
                self._head_started + self._limits.header_timeout, self._headers_too_slow
            )
        if in_head and self._in_head:
            # A head that spans reads: bound what the parser holds for it (one header
            # value can be megabytes long before the parser reports it). The piece in
            # which the head began is not counted, hence the slack of one slice.
            self._head_raw += len(data)
            if self._head_raw > self._limits.max_head + _SLICE:
                self._rejection = _too_large(431, "request head", self._limits.max_head)
                self._reject()
                return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._unsent = b""
        self._connections.discard(self)
        self._cancel_timers()
        if self._body is not None and not self._body.complete:
            self._body.finish(ClientError("the client went away mid-body"))
        self._release_writer()
        if self._streaming and self._worker is not None:
            # A body source can wait long for its next chunk (a quiet event stream): stop
            # it now, so it is closed now, rather than when it next has something to say.
            self._worker.cancel()

    def send_unsent(self) -> None:
        """Write what ``_send_soon`` kept back (SendBatch calls it at the end of the pass)."""
        data, self._unsent = self._unsent, b""
        transport = self.transport
        if data and transport is not None and not self._closed and not transport.is_closing():
            transport.write(data)

    def _send_soon(self, data: bytes) -> None:
        """Write ``data`` at the end of this pass of the loop, with the other connections'
        answers made in it; a large one, or one with no other answer in the making, is
        written now (keeping it would only delay it)."""
        if len(data) > BATCHED_MAX or self._connections.answering < 2:
            self._write(data)
        else:
            if not self._unsent:
                self._batch.add(self)
            self._unsent += data

    def close(self) -> None:
        self.send_unsent()
        self._closed = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            if transport.get_write_buffer_size():
                # close() waits for the buffer to drain; a client that never reads would
                # keep it (and the descriptor) forever.
                self._loop.call_later(self._limits.write_timeout, transport.abort)

    def _abort(self) -> None:
        self._unsent = b""
        self._closed = True
        if self.transport is not None:
            self.transport.abort()

    def _pause(self, reason: int) -> None:
        if not self._paused_for and self.transport is not None and not self._closed:
            self.transport.pause_reading()
        self._paused_for |= reason

    def _resume(self, reason: int) -> None:
        if self._paused_for & reason:
            self._paused_for &= ~reason
            if not self._paused_for and self.transport is not None and not self._closed:
                if self._unparsed:
                    unparsed, self._unparsed = self._unparsed, b""
                    self.data_received(unparsed)
                    if self._paused_for:
                        return  # still (or again) too much queued: the rest waits
                self.transport.resume_reading()

    def _pause_body(self) -> None:
        self._pause(_BODY)

    def _resume_body(self) -> None:
        self._resume(_BODY)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url_parts = []
        self._url_length = 0
        self._headers = []
        self._head_bytes = 0
        self._head_raw = 0
        self._in_head = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # The head's timer is armed by _feed only if the head outlasts this read (a head
        # usually arrives whole): one timer fewer per request.
        self._head_started = self._loop.time()

    def on_url(self, url: bytes) -> None:
        self._url_length += len(url)
        if self._url_length > self._limits.max_url:
            self._rejection = _too_large(414, "URL", self._limits.max_url)
            raise _Rejected
        self._url_parts.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        limits = self._limits
        if size > limits.max_header_line:
            self._rejection = _too_large(431, "header line", limits.max_header_line)
            raise _Rejected
        if len(self._headers) >= limits.max_headers:
            self._rejection = _too_large(431, "header count", limits.max_headers)
            raise _Rejected
        self._head_bytes += size
        if self._head_bytes > limits.max_head:
            self._rejection = _too_large(431, "request head", limits.max_head)
            raise _Rejected
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        parts = self._url_parts
        target = parts[0] if len(parts) == 1 else b"".join(parts)
        if self._parser.should_upgrade():
            self._url_parts = [target]
            return  # feed_data raises HttpParserUpgrade next; see _begin_upgrade
        raw_method = self._parser.get_method()
        method = _METHODS.get(raw_method)
        if method is None:
            method = raw_method.decode("ascii")
            if len(_METHODS) < 64:
                _METHODS[raw_method] = method
        host = ""
        has_body = chunked = False
        length = ""
        expect_continue = False
        for name, value in self._headers:
            lower = name.lower()
            if lower == "host":
                host = value
            elif lower == "content-length":
                length = value.strip()
                has_body = length not in ("", "0")
            elif lower == "transfer-encoding":
                has_body = chunked = True
            elif lower == "expect" and value.lower() == "100-continue":
                expect_continue = True
        if host != self._good_host:
            if not host:
                host = "localhost"
            elif not _valid_host(host):
                self._rejection = _simple_response(400, "Bad Request: invalid Host header\n")
                raise _Rejected
            else:
                self._good_host = host
        if target[:1] != b"/":
            origin = _origin_form(target)
            if origin is None:
                self._rejection = _simple_response(400, "Bad Request: invalid request target\n")
                raise _Rejected
            target = origin
        body: ChunkBuffer | None = None
        if has_body:
            high = self._limits.max_body_buffer
            body = ChunkBuffer(
                self._pause_body, self._resume_body, high_water=high, low_water=high // 4
            )
            # (the parser has checked the length: digits only, a single value)
            self._body_left = int(length) if not chunked and length.isdigit() else None
            self._body_progress = self._loop.time()
            self._body_timer = self._loop.call_later(self._limits.body_timeout, self._body_too_slow)
        # Answers go out in the order of the requests, interim ones too: behind requests
        # not yet answered, the 100 Continue waits for its turn.
        continue_in_turn = False
        if body is not None and expect_continue:
            if self._worker is None and not self._queue:
                self._write(_CONTINUE)
            else:
                continue_in_turn = self._continue_owed = True
        self._body = body
        request = Request(f"http://{host}{target.decode('latin-1')}", method=method, body=body)
        # The parser's pairs are already str: one copy, without the constructor's per-item
        # conversion of arbitrary header input.
        request.headers = CIMultiDict(self._headers)
        queue = self._queue
        queue.append((request, self._parser.should_keep_alive(), body, continue_in_turn))
        if len(queue) > self._limits.max_pipelined:
            self._pause(_PIPELINE)
        if self._worker is None:
            self._worker = self._loop.create_task(self._serve_queue())

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body.feed(body)
            self._body_progress = self._loop.time()
            if self._body_left is not None:
                self._body_left -= len(body)

    def on_message_complete(self) -> None:
        self._body_left = None
        self._continue_owed = False  # the body came without waiting for it
        if self._body is not None:
            self._body.finish()
            self._body = None
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

    # answering

    async def _serve_queue(self) -> None:
        queue = self._queue
        self._connections.answering += 1
        try:
            while queue and not self._closed:
                item = queue.popleft()
                if self._paused_for & _PIPELINE and len(queue) <= self._limits.max_pipelined:
                    self._resume(_PIPELINE)
                if isinstance(item, bytes):
                    # A malformed or over-limit request, answered in its turn: the last.
                    self._finish_with(item)
                    return
                request, keep_alive, body, continue_in_turn = item
                if continue_in_turn and body is not None:
                    if body is self._body:  # (a later body may owe its own 100)
                        self._continue_owed = False
                    if not (body.buffered or body.complete):
                        self._write(_CONTINUE)  # (none needed once the body is arriving)
                        # The client was waiting to be told: its body's time starts now.
                        self._body_progress = self._loop.time()
                try:
                    response = await self._respond(request)
                except Exception:
                    # respond() turns errors into responses; this is the net under it.
                    ident = error_id()
                    log.exception("Uncaught error answering %s (error id %s)", request, ident)
                    response = Response(f"Internal Server Error (error id {ident})\n", status=500)
                # A body the worker left unread would be taken for the next request.
                if body is not None and (not body.complete or body.error is not None):
                    keep_alive = False
                if self._connections.stopping:
                    keep_alive = False
                await self._write_response(request, response, keep_alive)
                if not keep_alive:
                    if (body is not None and not body.complete) or self._discard:
                        self._finish_with(b"")  # the client may still be sending
                    else:
                        self.close()
                    return
        except Exception as exc:
            # Whatever broke (a body that failed mid-stream, a client that stopped
            # reading, a bug), the client must not wait for more: end the connection.
            self._abort()
            if not isinstance(exc, ConnectionError | TimeoutError):
                log.error("Answer aborted (error id %s): %r", error_id(), exc, exc_info=exc)
        finally:
            self._connections.answering -= 1
            self._worker = None
            if self._pending_upgrade is not None:
                self._hand_over()
            else:
                self._arm_idle_timer()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.send_unsent()
            self.transport.write(data)

    async def _write_response(self, request: Request, response: Response, keep_alive: bool) -> None:
        if self._closed:
            await response.discard()  # the client is gone; its source may hold a container
            return
        transport = self.transport
        assert transport is not None
        status = response.status
        lines = []
        length: int | None = None
        date = _Date.now()
        try:
            good_names = GOOD_HEADER_NAMES
            for name, value in response.headers.items():
                if name not in good_names:
                    check_header_name(name)  # raises InvalidHeader, or remembers the name
                lower = name.lower()
                if lower in HOP_BY_HOP:
                    continue
                if lower == "content-length":
                    if value.strip().isdigit():
                        length = int(value)
                    continue
                if lower == "date":
                    date = b""  # the worker's (or the container's) own; never two
                lines.append(f"{name}: {value}\r\n")
            block = encode_header_block("".join(lines), len(lines))
        except InvalidHeader as exc:
            ident = error_id()
            log.error(
                "Response to %s %s not sent: %s (error id %s)",
                request.method,
                request.url,
                exc,
                ident,
            )
            await response.discard()
            self._write(
                _simple_response(500, f"Internal Server Error (error id {ident})\n", keep_alive)
            )
            return
        status_line = _STATUS_LINES.get(status)
        if status_line is None:
            status_line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Unknown").encode())
        head = [status_line, date, block]
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        if request.method == "HEAD" or status < 200 or status in (204, 304):
            if length is not None and status not in (204, 304):
                head.append(b"Content-Length: %d\r\n" % length)
            head.append(b"\r\n")
            self._send_soon(b"".join(head))
            await response.discard()
            return
        known = response.body_length
        if known is not None:
            body = await response.bytes() if known else b""
            head.append(b"Content-Length: %d\r\n\r\n" % len(body))
            head.append(body)
            self._send_soon(b"".join(head))
            if not self._can_write:
                await self.drain()  # under write_timeout: a client that never reads is cut off
            return
        chunked = length is None
        if length is None:
            head.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            head.append(b"Content-Length: %d\r\n\r\n" % length)
        stream = response.stream()
        self._streaming = True
        try:
            self.send_unsent()
            transport.write(b"".join(head))
            await self.send_body(transport, stream, chunked=chunked, closed=lambda: self._closed)
        except BaseException:
            # Mid-body, the only honest end is an abrupt one: no terminating chunk, so
            # the client cannot take a truncated body for a whole one.
            self._abort()
            raise
        finally:
            self._streaming = False
            await stream.aclose()

    # upgrades (WebSockets) go to aiohttp

    def _begin_upgrade(self, tail: bytes) -> None:
        method = self._parser.get_method().decode("ascii")
        version = self._parser.get_http_version()
        target = b"".join(self._url_parts).decode("latin-1")
        lines = [f"{method} {target} HTTP/{version}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in self._headers)
        lines.append("\r\n")
        self._pending_upgrade = "".join(lines).encode("latin-1") + tail
        self._pause(_UPGRADE)
        if self._worker is None:
            self._hand_over()

    def _hand_over(self) -> None:
        raw, self._pending_upgrade = self._pending_upgrade, None
        if self.transport is None or self._closed or raw is None:
            return
        self.send_unsent()
        self._connections.discard(self)
        self._cancel_timers()
        if self._paused_for:
            self._paused_for = 0
            self.transport.resume_reading()
        self._upgrade(self.transport, raw, self._headers)

    # timers

    def _arm_idle_timer(self) -> None:
        if not self._closed and not self._in_head:  # (a head's own timer is running)
            self._idle_since = now = self._loop.time()
            if self._idle_timer is None:
                self._idle_timer = self._loop.call_at(
                    now + self._limits.keep_alive_timeout, self._close_if_idle
                )

    def _cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _headers_too_slow(self) -> None:
        self._timer = None
        self._rejection = _simple_response(408, "Request Timeout: headers too slow\n")
        self._reject()

    def _body_too_slow(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.complete or self._closed:
            return
        timeout = self._limits.body_timeout
        waited = self._loop.time() - self._body_progress
        if self._paused_for or self._continue_owed:
            waited = 0.0  # the gateway is holding the client back, not the other way round
            self._body_progress = self._loop.time()
        if waited < timeout:
            self._body_timer = self._loop.call_later(timeout - waited, self._body_too_slow)
            return
        warn_limit("body-timeout", f"a request body stalled for {timeout:g} s")
        # The worker reading the body gets the error (and answers 408 through it); the
        # rest of this connection's bytes are never parsed.
        body.finish(RequestTimeout(f"no request body bytes for {timeout:g} s"))
        self._body = None
        self._discard = True
        self._resume(_BODY)
        if self._worker is None:
            self.close()

    def _close_if_idle(self) -> None:
        self._idle_timer = None
        if self._closed or self._in_head or not self.idle:
            return  # the end of the next answer arms it again
        due = self._idle_since + self._limits.keep_alive_timeout
        if self._loop.time() < due:  # requests came and went since it was armed
            self._idle_timer = self._loop.call_at(due, self._close_if_idle)
            return
        self.send_unsent()
        if self.transport is not None and self.transport.get_write_buffer_size():
            self._abort()
        else:
            self.close()

    def _reject(self) -> None:
        """Answer a malformed, over-limit or too slow request (after those before it)."""
        answer = self._rejection or _simple_response(400, "Bad Request\n")
        status = answer[9:12].decode()
        if status in ("414", "431"):
            warn_limit(status, f"a request head over the limits got {status}")
        self._discard = True
        self._in_head = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._body is not None and not self._body.complete:
            self._body.finish(ClientError("the request was malformed mid-body"))
            self._body = None
        if self._worker is None and not self._queue:
            self._finish_with(answer)
        else:
            self._queue.append(answer)

    def _finish_with(self, answer: bytes) -> None:
        """Send the last answer and close, reading (and dropping) what the client still
        sends for a moment: closing with unread bytes would reset the connection, and a
        reset can destroy the answer before the client reads it (a lingering close)."""
        transport = self.transport
        if transport is None or self._closed:
            return
        self.send_unsent()
        self._discard = True
        if answer:
            transport.write(answer)
        if not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        self._closed = True  # nothing more is written
        if self._paused_for:
            self._paused_for = 0
            transport.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self._limits.linger_timeout, self._end_linger)

    def _end_linger(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            if transport.get_write_buffer_size():
                self._loop.call_later(self._limits.write_timeout, transport.abort)


def _valid_host(host: str) -> bool:
    match = _HOST.fullmatch(host)
    if match is None or (match.group(1) is not None and int(match.group(1)) > 65535):
        return False
    try:
        URL(f"http://{host}/")  # for what the pattern lets through (such as "[:::]")
    except ValueError:
        return False
    return True


def _origin_form(target: bytes) -> bytes | None:
    """The path and query of an absolute-form or asterisk target, None for anything else."""
    if target == b"*":
        return b"/"
    lower = target[:8].lower()
    if lower.startswith((b"http://", b"https://")):
        slash = target.find(b"/", target.index(b"//") + 2)
        return b"/" if slash < 0 else target[slash:]
    return None


def _too_large(status: int, what: str, limit: int) -> bytes:
    return _simple_response(status, f"{_REASONS[status]}: {what} over {limit}\n")


def _simple_response(status: int, text: str, keep_alive: bool = False) -> bytes:
    body = text.encode()
    head = b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
    close = b"" if keep_alive else b"Connection: close\r\n"
    reason = _REASONS.get(status, "").encode()
    return head % (status, reason, len(body)) + close + b"\r\n" + body
