"""The node's router: wrk through Router + hand-off against the app's gateway directly.

Three processes, as under ``dockyard serve``: an app process (a ``Gateway`` on TCP, the
baseline, plus the same gateway on a unix socket with a ``HandoffServer``), a router
process (``Router`` resolving every host to that app) and wrk. Measured keep-alive (the
router only sees each connection's first request) and with ``Connection: close`` (every
request is a new connection through the router: the router's whole cost), the latter with
pooled hand-off connections and with one per transfer.

Not wired into ``python -m bench`` yet; run ``python -m bench.scenarios.serve_router``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..machine import describe_machine
from ..wrk import WrkResult, parse_wrk

__all__ = ["RouterRow", "run_serve_router"]


@dataclass(frozen=True, slots=True)
class RouterRow:
    mode: str  # "keep-alive" | "close"
    path: str  # "direct" | "router" | "router-no-pool"
    result: WrkResult


async def _wrk(url: str, *, connections: int, seconds: int, close: bool) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    proc = await asyncio.create_subprocess_exec(
        *argv, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return parse_wrk(out.decode(errors="replace"))


async def _start(*argv: str) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.scenarios.serve_router", *argv,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if not line.startswith(b"READY "):
        raise RuntimeError(f"{argv[0]} process did not start: {line!r}")
    return proc, int(line.split()[1])


async def _end(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def run_serve_router(*, connections: int = 16, seconds: int = 5) -> list[RouterRow]:
    rows: list[RouterRow] = []
    with tempfile.TemporaryDirectory(prefix="dy-router-") as directory:
        app, direct_port = await _start("app", directory)
        try:
            for pool in (4, 0):
                router, router_port = await _start("router", directory, str(pool))
                try:
                    urls = {
                        "direct": direct_port,
                        "router" if pool else "router-no-pool": router_port,
                    }
                    if pool == 0:
                        urls.pop("direct")
                    for close in (False, True):
                        if pool == 0 and not close:
                            continue  # (keep-alive hands off once per connection)
                        for path, port in urls.items():
                            url = f"http://127.0.0.1:{port}/"
                            await _wrk(url, connections=connections, seconds=1, close=close)
                            result = await _wrk(
                                url, connections=connections, seconds=seconds, close=close
                            )
                            mode = "close" if close else "keep-alive"
                            rows.append(RouterRow(mode, path, result))
                            print(
                                f"{mode:<10} {path:<14} {result.requests_per_s:>9,.0f} req/s  "
                                f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
                                + (f"  {result.errors} errors" if result.errors else ""),
                                file=sys.stderr,
                            )
                finally:
                    await _end(router)
        finally:
            await _end(app)
    return rows


# The two servers, each in a process of its own (uvloop, as `dockyard serve`).


async def _serve_app(directory: Path) -> None:
    from dockyard.gateway.handoff import HandoffServer
    from dockyard.gateway.server import Gateway
    from dockyard.http import Request, Response

    async def dispatch(request: Request) -> Response:
        return Response("hello from the app\n")

    async with (
        Gateway(dispatch, port=0) as tcp,
        Gateway(dispatch, path=directory / "app.http") as unix,
        HandoffServer(unix, directory / "app.ho"),
    ):
        print(f"READY {tcp.port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def _serve_router(directory: Path, pool: int) -> None:
    from dockyard.node.router import Router

    @dataclass(frozen=True)
    class Endpoint:
        handoff: Path
        http: Path

    endpoint = Endpoint(directory / "app.ho", directory / "app.http")
    async with Router(lambda host: endpoint, host="127.0.0.1", port=0, handoff_pool=pool) as r:
        print(f"READY {r.port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def main() -> None:
    import uvloop

    if len(sys.argv) > 2 and sys.argv[1] == "app":
        uvloop.run(_serve_app(Path(sys.argv[2])))
    elif len(sys.argv) > 3 and sys.argv[1] == "router":
        uvloop.run(_serve_router(Path(sys.argv[2]), int(sys.argv[3])))
    else:
        rows = uvloop.run(run_serve_router())
        figures = {f"{r.mode} {r.path}": r.result.requests_per_s for r in rows}
        ratios = {
            "keep-alive router/direct": figures["keep-alive router"] / figures["keep-alive direct"],
            "close router/direct": figures["close router"] / figures["close direct"],
            "close router-no-pool/router": figures["close router-no-pool"]
            / figures["close router"],
        }
        machine = describe_machine()
        print(json.dumps({"machine": machine, "req_per_s": figures, "ratios": ratios}, indent=2))
        print(f"(load average {os.getloadavg()})", file=sys.stderr)


if __name__ == "__main__":
    main()
