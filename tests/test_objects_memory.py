"""10,000 objects called once and evicted: memory must come back (bounded growth)."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

from dockyard.objects import DurableObject, ObjectHost
from tests.support.objects_helpers import wait_for

OBJECTS = 10_000
MAX_GROWTH_MB = 40  # RSS growth allowed after all objects were built and evicted


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Visited(DurableObject):
    async def visit(self) -> int:
        # a read of an object that never wrote opens no file
        return await self.ctx.storage.get("visits") or 0

    async def write(self) -> None:
        await self.ctx.storage.put("visits", 1)


async def test_ten_thousand_objects_are_evicted_and_memory_returns(tmp_path: Path) -> None:
    async with ObjectHost(tmp_path, app="t", idle_timeout=0.2) as host:
        host.set_class("Visited", Visited)
        ns = host.namespace("Visited")
        # warm up allocator and code paths before measuring
        await asyncio.gather(*(ns.get_by_name(f"warm{i}").visit() for i in range(500)))
        await wait_for(lambda: host.live_count() == 0, within=10)
        growths = []
        for round in range(2):
            gc.collect()
            before = rss_kb()
            for start in range(0, OBJECTS, 1000):
                batch = [ns.get_by_name(f"o{round}-{i}") for i in range(start, start + 1000)]
                assert await asyncio.gather(*(stub.visit() for stub in batch)) == [0] * 1000
            peak = host.live_count()
            await wait_for(lambda: host.live_count() == 0, within=20, what="eviction")
            gc.collect()
            after = rss_kb()
            growths.append((after - before) / 1024)
            print(
                f"\nround {round + 1}: {OBJECTS} objects (peak {peak} live): RSS "
                f"{before / 1024:.1f} -> {after / 1024:.1f} MB, growth {growths[-1]:.2f} MB, "
                f"{(after - before) * 1024 / OBJECTS:.0f} bytes per object"
            )
    # the first round raises the allocator's high-water mark; the second reuses it
    assert growths[0] < MAX_GROWTH_MB
    assert growths[1] < MAX_GROWTH_MB / 2


async def test_evicted_objects_close_their_storage(tmp_path: Path) -> None:
    async with ObjectHost(tmp_path, app="t", idle_timeout=1.0) as host:
        host.set_class("Visited", Visited)
        ns = host.namespace("Visited")
        fds = open_fds()
        await asyncio.gather(*(ns.get_by_name(f"w{i}").write() for i in range(200)))
        # live objects hold their SQLite files open (some may already be evicted on a
        # loaded machine: the idle timeout is short)
        assert open_fds() > fds
        await wait_for(lambda: host.live_count() == 0, within=10)
        assert open_fds() <= fds
        assert len(list((tmp_path / "objects" / "Visited").glob("*.sqlite"))) == 200
        assert await ns.get_by_name("w7").visit() == 1
