"""Object databases: open files stay bounded, and state files are private to the user."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dockyard.objects import DurableObject, ObjectHost
from dockyard.objects.files import default_open_files
from dockyard.objects.storage import DurableObjectStorage

LIMIT = 20
OBJECTS = 120


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Filer(DurableObject):
    async def write(self, value: int) -> None:
        storage = self.ctx.storage

        def both() -> None:  # one commit (one fsync) for the two writes
            storage.kv.put("n", value)
            storage.sql.exec("CREATE TABLE IF NOT EXISTS t (x)")
            storage.sql.exec("INSERT INTO t VALUES (?)", value)

        storage.transaction_sync(both)

    async def read(self) -> tuple[int, list[int]]:
        rows = self.ctx.storage.sql.exec("SELECT x FROM t").to_array()
        return await self.ctx.storage.get("n"), [row.x for row in rows]

    async def long_transaction(self, entered: asyncio.Event, go_on: asyncio.Event) -> None:
        async def body(txn: DurableObjectStorage) -> None:
            await txn.put("a", 1)
            entered.set()
            await go_on.wait()
            await txn.put("b", 2)

        await self.ctx.storage.transaction(body)

    async def pair(self) -> dict[str, int]:
        return await self.ctx.storage.get(["a", "b"])

    async def storage_of(self) -> DurableObjectStorage:
        return self.ctx.storage


@pytest.fixture
def small_limit() -> Iterator[None]:
    before = default_open_files.limit
    default_open_files.limit = LIMIT
    try:
        yield
    finally:
        default_open_files.limit = before


@pytest.mark.slow  # each idle close checkpoints its WAL (an fsync): about 4 s
async def test_open_databases_stay_bounded_and_reopen_intact(
    tmp_path: Path, small_limit: None
) -> None:
    # objects stay live (no eviction): only the open-files bound keeps fds down
    async with ObjectHost(tmp_path, app="t", idle_timeout=600) as host:
        host.set_class("Filer", Filer)
        ns = host.namespace("Filer")
        holder = ns.get_by_name("holder")
        await holder.write(0)
        entered, go_on = asyncio.Event(), asyncio.Event()
        txn = asyncio.create_task(holder.long_transaction(entered, go_on))
        await entered.wait()
        before = open_fds()
        peak = 0
        for i in range(OBJECTS):
            await ns.get_by_name(f"o{i}").write(i)
            peak = max(peak, open_fds())
        assert host.live_count() == OBJECTS + 1
        # three descriptors (db, -wal, -shm) per open database, at most LIMIT of them
        assert peak - before <= 3 * LIMIT
        # the object inside a transaction kept its connection: the transaction commits
        go_on.set()
        await txn
        assert await holder.pair() == {"a": 1, "b": 2}
        results = await asyncio.gather(*(ns.get_by_name(f"o{i}").read() for i in range(OBJECTS)))
        assert results == [(i, [i]) for i in range(OBJECTS)]
        assert open_fds() - before <= 3 * LIMIT
        assert len(default_open_files) <= LIMIT


async def test_state_folder_and_files_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        async with ObjectHost(tmp_path, app="t") as host:
            host.set_class("Filer", Filer)
            stub = host.namespace("Filer").get_by_name("p")
            await stub.write(1)
            storage = await stub.storage_of()
            await storage.set_alarm(datetime(2999, 1, 1, tzinfo=UTC))
            objects = tmp_path / "objects"
            folders = [objects, objects / "Filer"]
            files = [
                storage.path,
                Path(f"{storage.path}-wal"),
                Path(f"{storage.path}-shm"),
                objects / "Filer" / "_alarms.sqlite",
            ]
            for folder in folders:
                assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
            for file in files:
                assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    finally:
        os.umask(old_umask)


async def test_older_world_readable_files_are_tightened(tmp_path: Path) -> None:
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Filer", Filer)
        stub = host.namespace("Filer").get_by_name("old")
        path = (await stub.storage_of()).path
        await stub.write(1)
    os.chmod(path, 0o644)
    os.chmod(path.parent, 0o755)
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Filer", Filer)
        assert await host.namespace("Filer").get_by_name("old").read() == (1, [1])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
