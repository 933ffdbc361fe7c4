"""A minimal HTTP/1.1 server on asyncio (stdlib only): the container behind every path.

Answers every request with a short 200 and keeps connections alive, so the benchmark
measures the path in front of it, not the server. Request bodies with Content-Length
are skipped; anything else (chunked uploads) is answered and the connection closed.
"""

import asyncio
import os
import signal

BODY = b"ok\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
CLOSING = RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)


class Http(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.skip = 0  # body bytes of the current request still to discard
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buffer = self.buffer
        buffer += data
        while True:
            if self.skip:
                dropped = min(self.skip, len(buffer))
                del buffer[:dropped]
                self.skip -= dropped
                if self.skip:
                    return
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            del buffer[: end + 4]
            close = b"connection: close" in head or head.split(b"\r\n", 1)[0].endswith(b"/1.0")
            if b"transfer-encoding:" in head:
                close = True
            elif b"content-length:" in head:
                value = head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]
                self.skip = int(value.strip() or b"0")
            if close:
                self.transport.write(CLOSING)
                self.transport.close()
                return
            self.transport.write(RESPONSE)


async def main() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = int(os.environ.get("PORT", "8080"))
    server = await loop.create_server(Http, "0.0.0.0", port, backlog=1024, reuse_address=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
