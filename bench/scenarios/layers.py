"""CPU per warm request, layer by layer: where each microsecond of a request goes.

``python -m bench.scenarios.layers [--requests N] [--connections C] [--rounds R] [--unsettled]``

Everything runs in this one process and no client socket is involved: each client
connection is a transport of this module's own, fed straight into the gateway's protocol
(as a socket read would feed it), so the CPU this process spends per request is
Dockyard's own work plus the last hop's system calls. Each row adds one layer:

    gateway             the gateway answers a fixed response (parse, Request, write)
    plain object        + App, worker, stub and a plain Durable Object answering "ok"
    container, no hop   + Container facade, supervisor lease and forward, with the
                        exchange with the container replaced by a fixed answer
    container           the whole warm request, to the bench app's container
    upstream client     Dockyard's client for the last hop alone, same container
    bare protocol       an asyncio protocol that writes the same request and waits for
                        the answer: the floor of the last hop in Python

CPU time is the process's (user and kernel, from getrusage), per request, the median
of the rounds; "collector" is the part of it spent in garbage collections (timed by a
``gc`` callback). The heap is settled after the App starts, as ``dockyard dev`` and the
app processes of ``dockyard serve`` do (``dockyard._limits.settle_heap``); ``--unsettled``
leaves CPython's defaults, to compare.

The App has a state folder of its own, so its containers carry an owner label of their
own; they are stopped with it and any left are removed by that label.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

import dockyard.containers.container as container_module
from dockyard._limits import settle_heap
from dockyard.app import App
from dockyard.containers import labels
from dockyard.containers.docker import DockerRuntime
from dockyard.containers.runtime import ContainerInfo
from dockyard.containers.upstream import InNamespace, Target, UpstreamPool
from dockyard.gateway.protocol import HttpProtocol
from dockyard.gateway.server import Gateway
from dockyard.http import Request, Response
from dockyard.settings import Settings

from ..machine import describe_machine, load_average

APP = Path(__file__).resolve().parents[1] / "app"
WARM = "/web/layers"
HOST = "127.0.0.1:8787"
HEADERS = [("Host", HOST), ("User-Agent", "wrk"), ("Accept", "*/*")]
# Each layer's cost is its row less the row it stands on.
BELOW = {
    "plain object": "gateway",
    "container, no hop": "plain object",
    "container": "container, no hop",
    "upstream client": "bare protocol",
}


@dataclass(frozen=True, slots=True)
class Cost:
    """CPU per request, in microseconds."""

    user: float
    system: float
    collector: float = 0.0

    @property
    def total(self) -> float:
        return self.user + self.system


class _Transport:
    """What the gateway writes to, standing in for a client's socket."""

    def __init__(self, client: _Client) -> None:
        self._client = client
        self._closing = False

    def write(self, data: bytes) -> None:
        self._client.received(data)

    def writelines(self, parts: list[bytes]) -> None:
        self._client.received(b"".join(parts))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False


class _Client:
    """A keep-alive client: the next request goes out when the answer to the last is in
    (every answer measured here ends with "ok\\n")."""

    def __init__(self, load: _Load, request: bytes) -> None:
        self._load = load
        self._request = request
        self._buffer = b""
        self.protocol: HttpProtocol | None = None

    def received(self, data: bytes) -> None:
        self._buffer += data
        if not self._buffer.endswith(b"ok\n"):
            return
        self._buffer = b""
        if self._load.answered():
            asyncio.get_running_loop().call_soon(self.send)

    def send(self) -> None:
        assert self.protocol is not None
        self.protocol.data_received(self._request)


class _Load:
    def __init__(self, requests: int) -> None:
        self._left = requests
        self.done = asyncio.get_running_loop().create_future()

    def answered(self) -> bool:
        """Count one answer; whether another request should go out."""
        self._left -= 1
        if self._left <= 0 and not self.done.done():
            self.done.set_result(None)
        return self._left > 0


async def through_gateway(gateway: Gateway, path: str, requests: int, connections: int) -> Cost:
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    load = _Load(requests)
    clients = []
    for _ in range(connections):
        client = _Client(load, request)
        client.protocol = gateway.protocol()
        client.protocol.connection_made(_Transport(client))  # type: ignore[arg-type]
        clients.append(client)
    try:
        return await _measure(lambda: _start(clients, load), requests)
    finally:
        for client in clients:
            assert client.protocol is not None
            client.protocol.connection_lost(None)


async def _start(clients: list[_Client], load: _Load) -> None:
    for client in clients:
        client.send()
    await asyncio.wait_for(load.done, 300)


async def _measure(work: Callable[[], Awaitable[None]], requests: int) -> Cost:
    collecting = [0.0, 0.0]  # seconds in collections, when the running one started

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collecting[1] = time.perf_counter()
        else:
            collecting[0] += time.perf_counter() - collecting[1]

    gc.callbacks.append(timed)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        await work()
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        gc.callbacks.remove(timed)
    return Cost(
        (after.ru_utime - before.ru_utime) / requests * 1e6,
        (after.ru_stime - before.ru_stime) / requests * 1e6,
        collecting[0] / requests * 1e6,
    )


async def upstream_client(target: Target, requests: int, connections: int) -> Cost:
    runtime = DockerRuntime()
    pool = UpstreamPool(connect_inside=runtime.connect_in_container)

    async def one_connection(count: int) -> None:
        for _ in range(count):
            response = await pool.request(target, "GET", WARM, HEADERS)
            await response.read()

    async def run() -> None:
        await asyncio.gather(*(one_connection(requests // connections) for _ in range(connections)))

    try:
        await asyncio.gather(*(one_connection(10) for _ in range(connections)))  # connect
        return await _measure(run, requests // connections * connections)
    finally:
        pool.close()
        await runtime.aclose()


class _Bare(asyncio.Protocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if data.endswith(b"ok\n") and self.answer is not None and not self.answer.done():
            self.answer.set_result(None)


async def bare_protocol(target: Target, requests: int, connections: int) -> Cost:
    loop = asyncio.get_running_loop()
    runtime = DockerRuntime()
    request = f"GET {WARM} HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
    protocols = []
    try:
        for _ in range(connections):
            if isinstance(target, InNamespace):
                sock = await runtime.connect_in_container(
                    target.container_id, target.port, pid=target.pid
                )
                _, protocol = await loop.create_connection(_Bare, sock=sock)
            else:
                _, protocol = await loop.create_connection(_Bare, "127.0.0.1", target)
            protocols.append(protocol)

        async def one_connection(protocol: _Bare, count: int) -> None:
            assert protocol.transport is not None
            for _ in range(count):
                protocol.answer = loop.create_future()
                protocol.transport.write(request.encode())
                await protocol.answer

        async def run() -> None:
            await asyncio.gather(*(one_connection(p, requests // connections) for p in protocols))

        return await _measure(run, requests // connections * connections)
    finally:
        for protocol in protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        await runtime.aclose()


@contextmanager
def upstream_stubbed() -> Any:
    """The container facade's forward answers at once, in this process only."""
    real = container_module.forward_http

    async def answer_at_once(pool: Any, target: Any, request: Any, **callbacks: Any) -> Response:
        callbacks["on_finished"]()
        return Response(b"ok\n")

    container_module.forward_http = answer_at_once
    try:
        yield
    finally:
        container_module.forward_http = real


async def warm_container(runtime: DockerRuntime, owner: str) -> ContainerInfo:
    found = [
        info
        for info in await runtime.list({labels.APP: "dockyard-bench", labels.OWNER: owner})
        if info.running and info.labels.get(labels.NAME) == WARM.rsplit("/", 1)[1]
    ]
    if len(found) != 1:
        raise RuntimeError(f"expected one warm container, found {len(found)}")
    return found[0]


async def main(requests: int, connections: int, rounds: int, settled: bool = True) -> int:
    machine = describe_machine()
    print(json.dumps({"machine": machine, "load average": load_average()}, indent=1))
    state = Path(tempfile.mkdtemp(prefix="dockyard-layers-"))
    app = App(APP, settings=Settings(state_dir=state))
    runtime = DockerRuntime()
    rows: dict[str, list[Cost]] = {}
    try:
        await app.start()
        if settled:
            settle_heap()
        gateway = Gateway(app.handle)

        async def fixed(request: Request) -> Response:
            return Response(b"ok\n")

        bare_gateway = Gateway(fixed)
        answer = await app.handle(Request(f"http://{HOST}{WARM}"))
        if answer.status != 200:
            raise RuntimeError(f"the warm object answered {answer.status}")
        await answer.bytes()
        info = await warm_container(runtime, app.owner)
        port = info.host_ports[8080]
        target: Target = InNamespace(info.id, info.pid, 8080, port)
        if app.containers is None or not app.containers.upstream_in_namespace:
            target = port
        layers: list[tuple[str, Callable[[], Awaitable[Cost]]]] = [
            ("gateway", lambda: through_gateway(bare_gateway, "/", requests, connections)),
            ("plain object", lambda: through_gateway(gateway, "/plain/x", requests, connections)),
            ("container, no hop", lambda: _stubbed(gateway, requests, connections)),
            ("container", lambda: through_gateway(gateway, WARM, requests, connections)),
            ("upstream client", lambda: upstream_client(target, requests, connections)),
            ("bare protocol", lambda: bare_protocol(target, requests, connections)),
        ]
        for _name, measure in layers:  # once, unmeasured: caches, pools, first calls
            await measure()
        for round_number in range(rounds):
            # Rows alternate in each round, so drift on a busy machine hits all of them.
            for name, measure in layers:
                cost = await measure()
                rows.setdefault(name, []).append(cost)
                print(
                    f"round {round_number + 1}  {name:<18} {cost.total:7.1f} µs "
                    f"(user {cost.user:6.1f}, kernel {cost.system:5.1f}, "
                    f"collector {cost.collector:5.1f})",
                    flush=True,
                )
    finally:
        await app.stop()
        for left in await runtime.list({labels.OWNER: app.owner}):
            await runtime.remove(left.id)
        await runtime.aclose()
    where = "its own loopback" if isinstance(target, InNamespace) else "its published port"
    print(
        f"\nCPU per request, median of {rounds} rounds ({requests:,} requests, "
        f"{connections} connections; CPU {machine.get('CPU model', '?')}; "
        f"the container reached on {where}; heap {'settled' if settled else 'unsettled'}):\n"
    )
    print("| layer | µs per request | user | kernel | collector | added by the layer |")
    print("|---|---|---|---|---|---|")
    medians = {name: statistics.median(c.total for c in costs) for name, costs in rows.items()}
    for name, costs in rows.items():
        user = statistics.median(c.user for c in costs)
        system = statistics.median(c.system for c in costs)
        collector = statistics.median(c.collector for c in costs)
        below = BELOW.get(name)
        added = f"{medians[name] - medians[below]:+.1f} over {below}" if below else ""
        print(
            f"| {name} | {medians[name]:.1f} | {user:.1f} | {system:.1f} | {collector:.1f} "
            f"| {added} |"
        )
    return 0


async def _stubbed(gateway: Gateway, requests: int, connections: int) -> Cost:
    with upstream_stubbed():
        return await through_gateway(gateway, WARM, requests, connections)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios.layers")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--unsettled", action="store_true", help="CPython's collector defaults, to compare"
    )
    args = parser.parse_args()
    sys.exit(uvloop.run(main(args.requests, args.connections, args.rounds, not args.unsettled)))
