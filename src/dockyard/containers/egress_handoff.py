"""How an app process on a node gets a socket inside one of its containers: a listener
(egress), or a connection to a port on the container's loopback (the request path).

On ``dockyard serve`` an app's worker and objects run in an unprivileged process that
reaches the engine only through the node (remote.py). Egress control needs a socket made
inside the container's network namespace, which only root can make (netns.py); the
handlers, though, belong in the app process, beside the objects. So the node makes the
socket and hands it over: each app has a second unix socket, ``egress.sock`` beside its
``engine.sock`` (same mode and owner: the socket is the app's identity), and the node
applies the same policy as for every engine call (only the app's own containers).

Requests to a container take the same way for the same reason: a connection made on the
container's own loopback skips the engine's userland proxy (netns.py), and only root can
make it. The app asks once per pooled upstream connection, not per request.

The wire, one exchange per connection:

    app  -> node   {"container_id": "<full id>", "port": 15080}\\n
    node -> app    {"ok": true}\\n   with the listening socket attached (SCM_RIGHTS)
               or  {"error": {"type": ..., "message": ...}}\\n   (remote.py's errors)

    app  -> node   {"container_id": "<full id>", "port": 8080, "connect": true}\\n
    node -> app    {"ok": true, "connected": true}\\n   with the connected socket attached
               or  {"error": ...}\\n

The node closes its copy once sent: the socket then lives only in the app process, and
closes with it (or when the app closes it: the supervisor at the container's end for a
listener, the upstream pool for a connection).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import ContainerError, EngineUnavailable

__all__ = ["EGRESS_SOCKET", "ListenServer", "egress_socket_path", "request_socket"]

log = logging.getLogger("dockyard.containers")

EGRESS_SOCKET = "egress.sock"
_MAX_MESSAGE = 4096
_FD_SIZE = array.array("i").itemsize
_TIMEOUT = 30.0


def egress_socket_path(engine_socket: Path) -> Path:
    """Where the node serves an app's egress socket, given its engine socket."""
    return Path(engine_socket).with_name(EGRESS_SOCKET)


Make = Callable[[str, int], Awaitable[socket.socket]]
ErrorBody = Callable[[Exception], dict[str, Any]]


class ListenServer:
    """The node's end for one app: ``listen(container_id, port)`` and ``connect(...)`` make
    the socket (and apply the node's policy); ``error_body`` turns their failures into the
    wire's error. Without ``connect``, connections are refused with an error."""

    def __init__(
        self, path: Path, listen: Make, error_body: ErrorBody, connect: Make | None = None
    ) -> None:
        self.path = Path(path)
        self._listen = listen
        self._connect = connect
        self._error_body = error_body
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, uid: int | None = None) -> None:
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            if uid is not None:
                os.chown(self.path, uid, -1)
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self.path.unlink(missing_ok=True)
            raise
        self._sock = sock
        self._spawn(self._accept(sock))

    async def aclose(self) -> None:
        sock, self._sock = self._sock, None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if sock is not None:
            sock.close()
            self.path.unlink(missing_ok=True)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        made: socket.socket | None = None
        try:
            async with asyncio.timeout(_TIMEOUT):
                try:
                    ask = json.loads(await _read_line(loop, conn))
                    container_id, port = ask["container_id"], ask["port"]
                    if not isinstance(container_id, str) or not isinstance(port, int):
                        raise ContainerError("container_id must be a string, port an integer")
                    connect = ask.get("connect") is True
                    if not connect:
                        made = await self._listen(container_id, port)
                    elif self._connect is None:
                        raise ContainerError("this node makes no connections in containers")
                    else:
                        made = await self._connect(container_id, port)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    answer = self._error_body(ContainerError(f"bad request: {exc}"))
                except Exception as exc:
                    answer = self._error_body(exc)
                else:
                    answer = {"ok": True, "connected": True} if connect else {"ok": True}
                await _send(loop, conn, answer, made)
        except (OSError, TimeoutError) as exc:
            log.warning("egress socket %s: %s", self.path, exc)
        finally:
            if made is not None:
                made.close()  # the app holds its own copy now
            conn.close()


async def request_socket(
    path: Path,
    container_id: str,
    port: int,
    decode_error: Callable[[Any, str], ContainerError],
    *,
    connect: bool = False,
) -> socket.socket:
    """The app's end: a socket listening on 127.0.0.1:``port`` inside the container, or
    (``connect``) connected to it there, made by the node. Raises what the node raised
    (``decode_error`` rebuilds it: ``ContainerGone`` for a container that is not the
    app's), or ``EngineUnavailable`` when the node does not answer."""
    loop = asyncio.get_running_loop()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.setblocking(False)
    fds: list[int] = []
    try:
        async with asyncio.timeout(_TIMEOUT):
            await loop.sock_connect(conn, str(path))
            fields: dict[str, Any] = {"container_id": container_id, "port": port}
            if connect:
                fields["connect"] = True
            ask = json.dumps(fields) + "\n"
            await loop.sock_sendall(conn, ask.encode())
            data = b""
            while b"\n" not in data:
                chunk, received = await _receive(loop, conn)
                fds.extend(received)
                if not chunk:
                    raise ConnectionError("the node closed the egress socket without answering")
                data += chunk
                if len(data) > _MAX_MESSAGE:
                    raise ConnectionError("the node's answer is too long")
    except BaseException as exc:
        # Sockets already received belong to nobody else (a cancellation included).
        for fd in fds:
            os.close(fd)
        if not isinstance(exc, OSError | TimeoutError):
            raise
        raise EngineUnavailable(
            f"Could not get a socket in a container from the node at {path}: {exc}",
            address=str(path),
        ) from exc
    finally:
        conn.close()
    answer = json.loads(data.split(b"\n", 1)[0])
    # A node that did not understand "connect" would hand over a listener: never taken
    # for a connection.
    if answer.get("ok") is True and answer.get("connected", False) is connect and len(fds) == 1:
        made = socket.socket(fileno=fds[0])
        made.setblocking(False)
        return made
    for fd in fds:
        os.close(fd)
    raise decode_error(answer, str(path))


async def _read_line(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await loop.sock_recv(conn, _MAX_MESSAGE)
        if not chunk:
            raise ConnectionError("the app closed the egress socket mid-request")
        data += chunk
        if len(data) > _MAX_MESSAGE:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


async def _send(
    loop: asyncio.AbstractEventLoop,
    conn: socket.socket,
    answer: dict[str, Any],
    listener: socket.socket | None,
) -> None:
    payload = (json.dumps(answer) + "\n").encode()
    rights = []
    if listener is not None:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [listener.fileno()]))]
    while True:
        try:
            sent = conn.sendmsg([payload], rights)
            break
        except BlockingIOError:
            await _ready(loop, conn, write=True)
    if sent < len(payload):
        await loop.sock_sendall(conn, payload[sent:])


async def _receive(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> tuple[bytes, list[int]]:
    while True:
        try:
            data, ancillary, _, _ = conn.recvmsg(
                _MAX_MESSAGE, socket.CMSG_SPACE(4 * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
            )
            break
        except BlockingIOError:
            await _ready(loop, conn, write=False)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
    return data, fds.tolist()


async def _ready(loop: asyncio.AbstractEventLoop, conn: socket.socket, *, write: bool) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = conn.fileno()
    (loop.add_writer if write else loop.add_reader)(fd, done)
    try:
        await ready
    finally:
        with contextlib.suppress(Exception):
            (loop.remove_writer if write else loop.remove_reader)(fd)
