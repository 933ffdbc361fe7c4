"""A gateway in a process of its own, for tests that measure its memory and descriptors.

``python -m tests.support.gateway_server`` prints ``READY <port>`` once it listens, and
serves until SIGTERM. Routes: ``/echo`` (the request body back), ``/big?n=BYTES`` (a
streamed body of that size), anything else ``ok <method> <path>``.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import uvloop

from dockyard.gateway.server import Gateway, GatewayLimits
from dockyard.http import Request, Response

LIMITS = GatewayLimits(
    keep_alive_timeout=5.0,
    header_timeout=2.0,
    body_timeout=1.0,
    write_timeout=1.0,
    linger_timeout=0.5,
    stop_grace=1.0,
)
CHUNK = b"b" * 65536


async def big(size: int) -> AsyncIterator[bytes]:
    while size > 0:
        piece = CHUNK[:size]
        size -= len(piece)
        yield piece


async def dispatch(request: Request) -> Response:
    path = request.path
    if path == "/echo":
        return Response(await request.bytes())
    if path == "/big":
        size = request.query.get("n", "0")
        return Response(big(int(size) if size.isdigit() else 0))
    return Response(f"ok {request.method} {path}")


async def main() -> None:
    gateway = Gateway(dispatch, port=0, limits=LIMITS)
    port = await gateway.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"READY {port}", flush=True)
    await stop.wait()
    await gateway.stop()


if __name__ == "__main__":
    uvloop.run(main())
