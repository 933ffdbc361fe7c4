"""A seeded HTTP fuzzer and abusive clients against a gateway in its own process.

The server runs in a subprocess (tests/support/gateway_server.py) so that its resident
memory and open descriptors can be measured on their own. Bounded: a few thousand
requests, 32 at a time, each connection given at most a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SEED = 20261128
REQUESTS = 3000

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x?q=1&r=%20 HTTP/1.1\r\nHost: 127.0.0.1:8787\r\nAccept: */*\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /big?n=300000 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
]
NASTY = [b"\r\n", b"\n", b"\r", b"\x00", b":", b" ", b"\xff", b"\t", b"%", b"99999999999", b"-1"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(8)
        at = rng.randrange(len(data) + 1)
        if kind == 0 and data:  # flip a byte
            i = rng.randrange(len(data))
            data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
        elif kind == 1:  # insert something nasty
            data = data[:at] + rng.choice(NASTY) + data[at:]
        elif kind == 2:  # cut a piece out
            data = data[:at] + data[at + rng.randint(1, 20) :]
        elif kind == 3:  # truncate
            data = data[:at]
        elif kind == 4:  # repeat a piece
            end = min(len(data), at + rng.randint(1, 40))
            data = data[:end] + data[at:end] * rng.randint(2, 300) + data[end:]
        elif kind == 5:  # a long header
            data = data[:at] + b"X-Long: " + b"v" * rng.choice((100, 9000, 70000)) + data[at:]
        elif kind == 6:  # many headers
            data = data.replace(b"\r\n", b"\r\n" + b"X-N: 1\r\n" * rng.randint(1, 150), 1)
        else:  # a bogus length
            data = re.sub(rb"Content-Length: \d+", b"Content-Length: " + rng.choice(NASTY), data)
    return data


class Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.gateway_server"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("READY "), line
        self.port = int(line.split()[1])

    def rss_kib(self) -> int:
        return self._status("VmRSS")

    def peak_rss_kib(self) -> int:
        return self._status("VmHWM")

    def _status(self, field: str) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            assert self.proc.wait(10) == 0
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    try:
        yield running
    finally:
        running.stop()


async def ask(port: int, raw: bytes, *, half_close: bool, wait: float = 1.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        if half_close:
            writer.write_eof()
        parts = []
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(wait):
                while chunk := await reader.read(1 << 16):
                    parts.append(chunk)
        return b"".join(parts)
    finally:
        writer.transport.abort()


async def wait_until(condition: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def check_answers(port: int) -> None:
    raw = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nfuzzy"
    data = await ask(port, raw, half_close=False, wait=5)
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"\r\n\r\nfuzzy"), data
    data = await ask(
        port, b"GET /p HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", half_close=False
    )
    assert data.endswith(b"ok GET /p"), data


@pytest.mark.slow
async def test_fuzzed_requests_leave_the_server_answering_and_within_bounds(
    server: Server,
) -> None:
    for _ in range(100):  # warm up, so the baseline includes what serving allocates once
        await check_answers(server.port)
    rss, fds = server.rss_kib(), server.fds()
    rng = random.Random(SEED)
    started = time.monotonic()
    gate = asyncio.Semaphore(32)
    statuses: dict[bytes, int] = {}

    async def one(raw: bytes, half_close: bool) -> None:
        async with gate:
            data = await ask(server.port, raw, half_close=half_close)
            status = data[9:12] if data.startswith(b"HTTP/1.1 ") else b"---"
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(
        *(
            one(mutate(rng, rng.choice(SEEDS)), half_close=rng.random() < 0.7)
            for _ in range(REQUESTS)
        )
    )
    elapsed = time.monotonic() - started
    assert server.proc.poll() is None, "the server died"
    await check_answers(server.port)
    # Every connection the fuzzer opened is closed on the server's side too.
    assert await wait_until(lambda: server.fds() <= fds, 10), (server.fds(), fds)
    grown = (server.rss_kib() - rss) / 1024
    assert grown < 20, f"RSS grew by {grown:.1f} MiB"
    assert elapsed < 60
    assert statuses.get(b"200", 0) > 100 and statuses.get(b"400", 0) > 100, statuses
    print(f"fuzzed {REQUESTS} requests in {elapsed:.1f} s: {statuses}; RSS +{grown:.1f} MiB")


@pytest.mark.slow
async def test_clients_that_never_read_large_answers_are_bounded_and_cut_off(
    server: Server,
) -> None:
    await check_answers(server.port)
    rss, fds = server.rss_kib(), server.fds()
    socks = []
    for _ in range(10):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /big?n=100000000 HTTP/1.1\r\nHost: a\r\n\r\n")  # never read
        socks.append(sock)
    try:
        assert await wait_until(lambda: server.fds() >= fds + 10, 10)
        # Within the write timeout (1 s here) the server gives up on all ten.
        assert await wait_until(lambda: server.fds() <= fds, 15), (server.fds(), fds)
    finally:
        for sock in socks:
            sock.close()
    peak = (server.peak_rss_kib() - rss) / 1024
    assert peak < 64, f"10 unread 100 MB answers took {peak:.1f} MiB at their peak"
    await check_answers(server.port)
