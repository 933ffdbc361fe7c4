"""Passing accepted connections between processes, over a unix stream socket.

The node's router accepts every client connection, reads its first request head to learn
the host, and hands the connection to that host's app process: the socket itself (as
SCM_RIGHTS ancillary data) and the bytes already read from it. ``HandoffServer`` (in the
app process) gives both to its ``Gateway``, which serves the connection as if it had
accepted it. The app sees the client's real address: it owns the client's socket.

One frame per connection, nothing sent back::

    b"DYHO" | length of the bytes already read (4 bytes, big-endian) | those bytes

The descriptor travels with the frame's first byte. ``HandoffClient`` (in the router)
sends frames, keeping a few connections to each hand-off socket open between transfers.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
from collections import deque
from pathlib import Path

from .server import Gateway, _remove_stale_socket

__all__ = ["HandoffClient", "HandoffError", "HandoffServer", "check_peer"]

log = logging.getLogger("dockyard.gateway")

_MAGIC = b"DYHO"
_HEADER = struct.Struct("!4sI")
# The most bytes a frame may carry: the router sends a request head (at most
# ``GatewayLimits.max_head`` and a slice) plus what came with it in the same reads.
MAX_INITIAL = 1 << 20
_RECV_SIZE = 256 * 1024
# Linux ends a read at a message that carries descriptors, so one read sees at most a
# frame's worth; room for more costs nothing and keeps a confused peer detectable.
_FDS_PER_READ = 8
_FD_SIZE = array.array("i").itemsize
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_ACCEPT_BACKOFF = 0.1


class HandoffError(Exception):
    """The peer broke the hand-off protocol; the connection to it is closed."""


class HandoffServer:
    """Listens on ``path`` for connections handed off by another process, and has
    ``gateway`` (which must be started) serve them."""

    def __init__(self, gateway: Gateway, path: str | Path, *, backlog: int = 128) -> None:
        self.gateway = gateway
        self.path = Path(path)
        self._backlog = backlog
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._peers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HandoffServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        _remove_stale_socket(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            listener.bind(str(self.path))
            listener.listen(self._backlog)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(listener))

    async def stop(self) -> None:
        """Stop accepting hand-offs; descriptors received and not yet served are closed."""
        tasks = [t for t in (self._accepting, *self._peers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            _remove_stale_socket(self.path)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                peer, _ = await loop.sock_accept(listener)
            except OSError as exc:
                # Out of descriptors, say: the pending connection stays readable, so
                # back off rather than spin (a back-off, not a wait for a condition).
                log.warning("hand-off socket %s: accept failed: %s", self.path, exc)
                await asyncio.sleep(_ACCEPT_BACKOFF)
                continue
            task = loop.create_task(self._serve_peer(peer))
            self._peers.add(task)
            task.add_done_callback(self._peers.discard)

    async def _serve_peer(self, peer: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        frames = _Frames()
        try:
            while True:
                while frames.ready:
                    fd, initial = frames.ready.popleft()
                    try:
                        sock = socket.socket(fileno=fd)
                    except OSError:
                        os.close(fd)  # not a socket: nothing to serve
                        continue
                    try:
                        await self.gateway.serve_accepted(sock, initial)
                    except OSError as exc:  # (the socket is closed)
                        log.warning("a handed-off connection could not be served: %s", exc)
                await _readable(loop, peer)
                try:
                    data, fds = _receive(peer)
                except BlockingIOError:
                    continue
                if not data:
                    return
                frames.feed(data, fds)
        except HandoffError as exc:
            log.warning("hand-off socket %s: %s; closing that connection", self.path, exc)
        except ConnectionError:
            pass
        finally:
            frames.close()
            peer.close()


class HandoffClient:
    """Sends connections to hand-off sockets.

    Up to ``pool`` connections to each socket stay open between transfers: a transfer on
    an open connection is one ``sendmsg``, against a ``connect`` and an ``accept`` more
    for a fresh one. A pooled connection whose peer went away (the app process
    restarted) fails at once and is replaced by a fresh one.
    """

    def __init__(self, *, pool: int = 4) -> None:
        self._pool = pool
        self._idle: dict[tuple[Path, int | None], list[socket.socket]] = {}

    async def send(self, path: Path, fd: int, initial: bytes, *, pid: int | None = None) -> None:
        """Hand the socket ``fd`` and ``initial`` to the server on ``path``.

        With ``pid``, only a server in that process will do (its SO_PEERCRED is checked).
        On return the receiver holds the socket and the caller should close its copy.
        Raises ``OSError`` when it cannot be delivered (no server there, refused, another
        process listening); the caller's socket is then untouched.
        """
        if len(initial) > MAX_INITIAL:
            raise ValueError(f"at most {MAX_INITIAL} bytes ride with a hand-off")
        frame = _HEADER.pack(_MAGIC, len(initial)) + initial
        loop = asyncio.get_running_loop()
        key = (path, pid)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            try:
                await _send_frame(loop, conn, frame, fd)
            except OSError:
                conn.close()  # the receiver went away since: try the next one
                continue
            except BaseException:
                conn.close()
                raise
            self._keep(key, conn)
            return
        conn = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            await loop.sock_connect(conn, str(path))
            if pid is not None:
                check_peer(conn, pid)
            await _send_frame(loop, conn, frame, fd)
        except BaseException:
            conn.close()
            raise
        self._keep(key, conn)

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _keep(self, key: tuple[Path, int | None], conn: socket.socket) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self._pool:
            idle.append(conn)
        else:
            conn.close()


def check_peer(conn: socket.socket, pid: int) -> None:
    """Raise ``PermissionError`` unless the unix socket ``conn`` leads to process ``pid``."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    peer, _, _ = _PEERCRED.unpack(creds)
    if peer != pid:
        raise PermissionError(f"the socket is served by process {peer}, not {pid}")


class _Frames:
    """Frames parsed from a peer's bytes, each matched with the next descriptor."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self.ready: deque[tuple[int, bytes]] = deque()

    def feed(self, data: bytes, fds: list[int]) -> None:
        self._fds.extend(fds)
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _HEADER.size:
            magic, size = _HEADER.unpack_from(buffer)
            if magic != _MAGIC or size > MAX_INITIAL:
                raise HandoffError("not a hand-off frame")
            end = _HEADER.size + size
            if len(buffer) < end:
                return
            if not self._fds:
                raise HandoffError("a frame came without its descriptor")
            self.ready.append((self._fds.popleft(), bytes(buffer[_HEADER.size : end])))
            del buffer[:end]

    def close(self) -> None:
        """Close every descriptor received and not taken."""
        while self.ready:
            os.close(self.ready.popleft()[0])
        while self._fds:
            os.close(self._fds.popleft())


def _receive(peer: socket.socket) -> tuple[bytes, list[int]]:
    data, ancillary, flags, _ = peer.recvmsg(
        _RECV_SIZE, socket.CMSG_SPACE(_FDS_PER_READ * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise HandoffError("more descriptors than one read may carry")
    return data, fds.tolist()


async def _send_frame(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, frame: bytes, fd: int
) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    while True:
        try:
            sent = conn.sendmsg([frame], rights)
            break
        except BlockingIOError:
            await _writable(loop, conn)
    if sent < len(frame):
        await loop.sock_sendall(conn, memoryview(frame)[sent:])


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), _set_done, ready)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()
    loop.add_writer(sock.fileno(), _set_done, ready)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
