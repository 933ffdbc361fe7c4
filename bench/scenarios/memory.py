"""Memory: dockyard dev's RSS with many idle plain Durable Objects, live and evicted.

Runs its own dockyard dev, so the baseline is a fresh process and eviction can be
shortened (``--object-idle-timeout 1``) where the CLI has that option. A second round
with other objects tells a leak (RSS grows again) from memory the allocator kept for
reuse (RSS stays put).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from ..prereqs import dev_args
from ..probe import bounded
from ..processes import DevServer
from ..results import MemoryResult
from . import Plan, progress

__all__ = ["run_memory"]

CONCURRENCY = 64
IDLE_TIMEOUT = 1.0  # with --object-idle-timeout
DEFAULT_IDLE_TIMEOUT = 70.0  # dockyard dev's default


async def run_memory(
    plan: Plan, project: Path, workdir: Path, *, idle_option: bool
) -> tuple[MemoryResult, list[str]]:
    notes: list[str] = []
    idle = IDLE_TIMEOUT if idle_option else DEFAULT_IDLE_TIMEOUT
    args = ("--object-idle-timeout", f"{idle:g}") if idle_option else ()
    dev = DevServer(project, workdir / "dev-memory.log", *args, *dev_args())
    # Waiting out the default idle timeout twice does not fit in --quick.
    rounds = 2 if idle_option else 1 if not plan.quick else 0
    try:
        url = await dev.start()
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as session:
            await _touch_all(session, url, ["warm-up"])
            baseline = await _settled_rss(dev)
            await _touch_all(session, url, [f"a-{i}" for i in range(plan.objects)])
            touched = dev.rss_kib()
            progress(
                f"memory: {baseline / 1024:.0f} MiB before, {touched / 1024:.0f} MiB with "
                f"{plan.objects:,} objects touched ({await _live(session, url)} reported live)"
            )
            evicted: list[int] = []
            live_after: int | None = None
            for round_ in range(rounds):
                if round_:
                    await _touch_all(session, url, [f"b-{i}" for i in range(plan.objects)])
                live_after = await bounded(
                    _wait_evicted(session, url, idle), idle + 60, "objects were not evicted"
                )
                evicted.append(await _settled_rss(dev))
                progress(
                    f"memory: {evicted[-1] / 1024:.0f} MiB after eviction (round {round_ + 1})"
                )
    finally:
        await dev.stop()
    if not idle_option:
        notes.append(
            "memory: dockyard dev has no --object-idle-timeout; "
            + (
                f"waited out its default ({idle:g} s) once"
                if rounds
                else "eviction not measured in --quick"
            )
        )
    second = evicted[1] if len(evicted) > 1 else None
    first = evicted[0] if evicted else None
    return MemoryResult(plan.objects, baseline, touched, first, live_after, second), notes


async def _touch_all(session: aiohttp.ClientSession, url: str, names: list[str]) -> None:
    """One request to each named object, CONCURRENCY at a time."""
    shared = iter(names)
    await asyncio.gather(*(_touch(session, url, shared) for _ in range(CONCURRENCY)))


async def _touch(session: aiohttp.ClientSession, url: str, names: Iterator[str]) -> None:
    for name in names:
        async with session.get(f"{url}/plain/{name}") as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"plain object {name} answered {response.status}")


async def _live(session: aiohttp.ClientSession, url: str) -> int | None:
    """Live plain objects as the worker's /live reports them; None if it cannot tell."""
    async with session.get(f"{url}/live") as response:
        live = json.loads(await response.text())
    return None if live is None else int(live.get("Plain", 0))


async def _wait_evicted(session: aiohttp.ClientSession, url: str, idle: float) -> int | None:
    """Until no plain object is live; without a live count, wait the idle timeout out."""
    if await _live(session, url) is None:
        await asyncio.sleep(idle + 10)
        return None
    while True:
        live = await _live(session, url)
        if not live:
            return live
        await asyncio.sleep(0.25)


async def _settled_rss(dev: DevServer, rounds: int = 20) -> int:
    """RSS once two samples half a second apart differ by under 1 % (at most 10 s)."""
    previous = dev.rss_kib()
    for _ in range(rounds):
        await asyncio.sleep(0.5)
        current = dev.rss_kib()
        if abs(current - previous) <= previous / 100:
            return current
        previous = current
    return previous
