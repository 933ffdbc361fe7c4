"""Sockets made inside another process's network namespace: listening, or connected.

The egress proxy of a container must answer on the container's own loopback
(``127.0.0.1:<port>`` as the container sees it), while Dockyard serves it from its own
event loop. A socket belongs to the namespace of the thread that created it, for its whole
life, whatever thread later uses it. So one short-lived thread enters the container's
namespace (``setns`` on ``/proc/<pid>/ns/net``), creates, binds and listens, and ends;
the loop then serves the socket with ``loop.create_server(sock=...)``. Nothing listens on
any host address, and the host never addresses the container's bridge IP.

The thread is a fresh one, never a pool thread: after ``setns`` it lives in the
container's namespace, and a pool would hand it to unrelated work. ``setns`` needs
CAP_SYS_ADMIN (root) and the container's process visible in this process's ``/proc``
(the engine is local and shares the PID namespace); `can_enter` says whether both hold.

`connect_in_namespace` is the request path's use: a connection to a container port made
on the container's own loopback skips the engine's userland proxy (docker-proxy), which
otherwise reads and writes every byte once more and wakes once more per request (see the
README's benchmark). Before entering, it checks that the process still belongs to the
container (its cgroup names the container's id), so a reused PID never leads elsewhere;
so does `listen_in_namespace`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import functools
import os
import socket
import threading
from collections.abc import Callable

from ..errors import ContainerError

__all__ = ["can_enter", "connect_in_namespace", "listen_in_namespace"]

# From <sched.h>: setns() accepts only a network namespace for this fd.
CLONE_NEWNET = 0x40000000


def can_enter(pid: int) -> bool:
    """Whether this process may make sockets in the namespace of process ``pid``."""
    return os.geteuid() == 0 and os.path.exists(f"/proc/{pid}/ns/net")


async def listen_in_namespace(
    pid: int, container_id: str, port: int, backlog: int = 128
) -> socket.socket:
    """A non-blocking TCP socket listening on ``127.0.0.1:port`` in the network namespace
    of process ``pid``, which must belong to container ``container_id``. Raises
    ``ContainerError`` when the namespace cannot be entered (or the process is not the
    container's) or the port is taken there."""
    return await _in_namespace(pid, lambda: _listen(pid, container_id, port, backlog))


async def connect_in_namespace(
    pid: int, container_id: str, port: int, connect_seconds: float
) -> socket.socket:
    """A non-blocking TCP socket connected to ``127.0.0.1:port`` in the network namespace
    of process ``pid``, which must belong to container ``container_id``. Raises
    ``ContainerError`` when the namespace cannot be entered (or the process is not the
    container's), ``OSError`` when nothing accepts the connection there within
    ``connect_seconds``."""
    return await _in_namespace(pid, lambda: _connect(pid, container_id, port, connect_seconds))


async def _in_namespace(pid: int, make: Callable[[], socket.socket]) -> socket.socket:
    """Run ``make`` on a fresh thread (which it may move into another namespace)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[socket.socket] = loop.create_future()

    def settle(result: socket.socket | BaseException) -> None:
        if done.cancelled():
            if isinstance(result, socket.socket):
                result.close()
        elif isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)

    def work() -> None:
        try:
            result: socket.socket | BaseException = make()
        except BaseException as exc:  # handed to the loop, raised there
            result = exc
        loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=work, name=f"netns-{pid}", daemon=True).start()
    try:
        return await done
    except asyncio.CancelledError:
        # Cancelled after the socket arrived but before this coroutine resumed: nobody
        # else will ever close it.
        if done.done() and not done.cancelled() and done.exception() is None:
            done.result().close()
        raise


def _listen(pid: int, container_id: str, port: int, backlog: int) -> socket.socket:
    _enter(pid, container_id)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # The next process of an app (a reload on a node) listens while the one it
        # replaces still does, until that one ends: both serve meanwhile (the kernel
        # spreads new connections), and the port is never left without a listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ContainerError(
            f"cannot listen on 127.0.0.1:{port} inside the container: {exc.strerror}"
        ) from exc
    return sock


def _connect(pid: int, container_id: str, port: int, timeout: float) -> socket.socket:
    _enter(pid, container_id)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _enter(pid: int, container_id: str) -> None:
    """Move this thread into the network namespace of ``pid``, a process of container
    ``container_id``."""
    libc = _libc()
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ContainerError(
            f"cannot open the network namespace of process {pid}: {exc.strerror}"
        ) from exc
    try:
        # Checked after the namespace is open: if the PID was reused before the open, the
        # cgroup read here names another container (or none) and nothing is entered.
        if not _belongs_to(pid, container_id):
            raise ContainerError(f"process {pid} is not container {container_id[:12]}'s")
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            hint = " (needs root: CAP_SYS_ADMIN)" if code == errno.EPERM else ""
            raise ContainerError(
                f"cannot enter the network namespace of process {pid}: {os.strerror(code)}{hint}"
            )
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    # Looked up once: find_library runs ldconfig, which costs a process per call.
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _belongs_to(pid: int, container_id: str) -> bool:
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as cgroups:
            return container_id in cgroups.read()
    except OSError:
        return False
