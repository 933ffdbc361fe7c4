"""Object names: bounded in length, valid Unicode, and a bounded name cache."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest

from dockyard.errors import InvalidObjectId, InvalidObjectName
from dockyard.objects import DurableObject, ObjectHost
from dockyard.objects.ids import MAX_NAME_BYTES


class Named(DurableObject):
    async def who(self) -> str | None:
        return self.ctx.id.name


async def test_names_up_to_the_limit_work_and_longer_ones_are_a_400(tmp_path: Path) -> None:
    assert MAX_NAME_BYTES == 1024
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Named", Named)
        ns = host.namespace("Named")
        longest = "é" * 512  # 1024 bytes of UTF-8
        assert await ns.get_by_name(longest).who() == longest
        for too_long in ["é" * 512 + "x", "x" * 1025, "x" * 1_000_000]:
            with pytest.raises(InvalidObjectName, match="at most 1024 bytes") as info:
                ns.id_from_name(too_long)
            assert info.value.status == 400
            assert len(str(info.value)) < 300  # the name is not echoed in full
            with pytest.raises(InvalidObjectName):
                ns.get_by_name(too_long)


@pytest.mark.parametrize("name", ["\ud800", "a\udfffb", "x" * 10 + "\udc80"])
async def test_a_lone_surrogate_name_is_a_400_not_a_unicode_error(
    tmp_path: Path, name: str
) -> None:
    async with ObjectHost(tmp_path, app="t") as host:
        ns = host.namespace("Named")
        with pytest.raises(InvalidObjectName, match="lone surrogate") as info:
            ns.id_from_name(name)
        assert info.value.status == 400
        assert isinstance(info.value, InvalidObjectId)


async def test_the_name_cache_is_bounded_by_bytes(tmp_path: Path) -> None:
    async with ObjectHost(tmp_path, app="t") as host:
        ns = host.namespace("Named")
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(10_000):
                ns.id_from_name(f"{i:08d}" + "n" * 1000)
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # 10,000 names of ~1 KiB (10 MiB) went through; the cache keeps at most ~1 MiB
        assert kept < 1.5 * 1024 * 1024, f"{kept / 1024:.0f} KiB kept"
        # cached or not, a name always gives the same id
        assert ns.id_from_name("00000001" + "n" * 1000) == ns.id_from_name("00000001" + "n" * 1000)
