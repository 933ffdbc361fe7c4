"""Log capture under load: does storing every container line cost the request path?

``python -m bench.scenarios.log_capture [--quick]``. The bench app is deployed to a real
``dockyard serve``; one object's container is kept warm for wrk, another ("spew") prints
RATE lines a second for SECONDS seconds (a Python loop inside it, writing to the
container's own stdout through /proc/1/fd/1, paced every 50 ms). The warm path is measured
with wrk alone and while the spew runs, alternating twice so drift hits both; then the
spew's lines are counted in the node's log store (its SQLite file, read-only).

Everything listens on 127.0.0.1; every load is bounded; the node is stopped with SIGTERM
and anything left with its owner label is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import secrets
import shutil
import sqlite3
import statistics
import sys
import time

import aiohttp

from ..machine import describe_machine, load_average
from .serve_path import HOST, Serve, _prepare, get, wrk

RATE = 20_000
CONNECTIONS = 16

SPEW = """
import os, sys, time
marker, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = os.fdopen(os.open("/proc/1/fd/1", os.O_WRONLY), "w", buffering=1 << 16)
step = rate // 20
began = time.monotonic()
for tick in range(seconds * 20):
    out.write("".join(f"{marker} {tick * step + i}\\n" for i in range(step)))
    out.flush()
    time.sleep(max(0.0, began + (tick + 1) / 20 - time.monotonic()))
"""


async def spew(node: Serve, container_id: str, marker: str, seconds: int) -> float:
    headers = {"Authorization": f"Bearer {node.token}"}
    cmd = ["python3", "-c", SPEW, marker, str(RATE), str(seconds)]
    began = time.perf_counter()
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.post(
            f"{node.admin_url}/api/v1/containers/{container_id}/exec", json={"cmd": cmd}
        ) as response,
    ):
        body = await response.json()
        if response.status != 200 or body.get("exit_code") != 0:
            raise RuntimeError(f"spew failed: {response.status} {body}")
    return time.perf_counter() - began


def stored(node: Serve, marker: str) -> int:
    """Distinct lines of this spew in the node's store (duplicates are reported apart).
    A row holds one line, or a batch of them joined by newlines."""
    db = node.data / "observe" / "logs.db"
    lines: list[str] = []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        for (message,) in conn.execute(
            "select message from logs where source = 'container' and message like ?",
            (f"%{marker} %",),
        ):
            lines.extend(line for line in message.split("\n") if line.startswith(marker + " "))
    distinct = set(lines)
    if len(lines) != len(distinct):
        twice = [line for line, n in collections.Counter(lines).items() if n > 1][:5]
        print(f"  {len(lines) - len(distinct)} lines stored twice, e.g. {twice}", flush=True)
    return len(distinct)


async def unowned_spew(seconds: int) -> None:
    """RATE lines a second for ``seconds`` from a plain container (no Dockyard label but
    the bench's, removed after)."""
    proc = await asyncio.create_subprocess_exec(
        "docker", "run", "--rm", "--label", "dockyard.bench=log-capture",
        "dockyard/python:bookworm", "python3", "-c", SPEW, "plain", str(RATE), str(seconds),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.wait_for(proc.wait(), seconds + 60)


async def container_ids(node: Serve, app: str) -> set[str]:
    headers = {"Authorization": f"Bearer {node.token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(f"{node.admin_url}/api/v1/apps/{app}/containers") as response,
    ):
        body = await response.json()
    return {str(container["id"]) for container in body["containers"]}


async def main(quick: bool) -> int:
    seconds = 5 if quick else 10
    if shutil.which("wrk") is None:
        print("wrk is not installed (scripts/setup installs it for the bench)", file=sys.stderr)
        return 1
    base, project = _prepare()
    node = Serve(base)
    idle: list[float] = []
    quiet: list[float] = []
    loud: list[float] = []
    counts: list[tuple[int, int]] = []
    try:
        await node.start()
        await node.deploy(project)
        async with aiohttp.ClientSession() as session:
            await get(session, node.app_url + "/web/warm", HOST)
            before = await container_ids(node, "dockyard-bench")
            await get(session, node.app_url + "/web/spew", HOST)
        (spewer,) = await container_ids(node, "dockyard-bench") - before
        url = node.app_url + "/web/warm"
        await wrk(url, CONNECTIONS, 2, HOST)
        for round_ in range(2):
            result = await wrk(url, CONNECTIONS, seconds, HOST)
            idle.append(result.requests_per_s)
            print(f"round {round_ + 1}: no spew   {result.requests_per_s:>9,.0f} req/s", flush=True)
            # The same lines from a container the node does not own: the engine stores
            # them, Dockyard does not read them (the run without Dockyard's logging).
            load = asyncio.create_task(wrk(url, CONNECTIONS, seconds, HOST))
            await unowned_spew(seconds)
            result = await load
            quiet.append(result.requests_per_s)
            print(
                f"round {round_ + 1}: spew not captured {result.requests_per_s:>9,.0f} req/s",
                flush=True,
            )
            marker = "spew-" + secrets.token_hex(4)
            load = asyncio.create_task(wrk(url, CONNECTIONS, seconds, HOST))
            took = await spew(node, spewer, marker, seconds)
            result = await load
            loud.append(result.requests_per_s)
            deadline = time.monotonic() + 60
            count = stored(node, marker)
            while count < RATE * seconds and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                count = stored(node, marker)
            counts.append((count, RATE * seconds))
            print(
                f"round {round_ + 1}: with spew {result.requests_per_s:>9,.0f} req/s; "
                f"{count:,} of {RATE * seconds:,} lines stored (spew took {took:.1f} s)",
                flush=True,
            )
    finally:
        await node.stop()
        for line in node.log.read_text(errors="replace").splitlines():
            if "Log stream" in line or "log cursor" in line:
                print("  node:", line[:200], flush=True)  # why a stream was read again
        shutil.rmtree(base, ignore_errors=True)
    machine = describe_machine()
    ratio = statistics.mean(loud) / statistics.mean(quiet)
    print(f"\nCPU: {machine['CPU model']} ({machine['CPUs (nproc)']}); load {load_average()}")
    print(
        f"warm throughput while a container prints {RATE:,} lines/s: "
        f"{statistics.mean(quiet) / statistics.mean(idle):.3f}x idle when the node does not "
        f"capture them; {ratio:.3f}x that when it stores every one"
    )
    print(f"lines stored: {', '.join(f'{c:,}/{e:,}' for c, e in counts)}")
    return 0 if all(c == e for c, e in counts) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 s loads instead of 10 s")
    sys.exit(asyncio.run(main(parser.parse_args().quick)))
