"""A listening socket made inside another process's network namespace.

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
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import socket
import threading

from ..errors import ContainerError

__all__ = ["can_enter", "listen_in_namespace"]

# From <sched.h>: setns() accepts only a network namespace for this fd.
CLONE_NEWNET = 0x40000000


def can_enter(pid: int) -> bool:
    """Whether this process may make sockets in the namespace of process ``pid``."""
    return os.geteuid() == 0 and os.path.exists(f"/proc/{pid}/ns/net")


async def listen_in_namespace(pid: int, port: int, backlog: int = 128) -> socket.socket:
    """A non-blocking TCP socket listening on ``127.0.0.1:port`` in the network namespace
    of process ``pid``. Raises ``ContainerError`` when the namespace cannot be entered or
    the port is taken there."""
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
            result: socket.socket | BaseException = _listen(pid, port, backlog)
        except BaseException as exc:  # handed to the loop, raised there
            result = exc
        loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=work, name=f"netns-{pid}", daemon=True).start()
    return await done


def _listen(pid: int, port: int, backlog: int) -> socket.socket:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ContainerError(
            f"cannot open the network namespace of process {pid}: {exc.strerror}"
        ) from exc
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            hint = " (needs root: CAP_SYS_ADMIN)" if code == errno.EPERM else ""
            raise ContainerError(
                f"cannot enter the network namespace of process {pid}: {os.strerror(code)}{hint}"
            )
    finally:
        os.close(fd)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ContainerError(
            f"cannot listen on 127.0.0.1:{port} inside the container: {exc.strerror}"
        ) from exc
    return sock
