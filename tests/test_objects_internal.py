"""Internal state (``storage.internal``, container schedules) lives apart from user data."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dockyard.containers.schedules import ScheduleTable
from dockyard.errors import StorageError
from dockyard.objects import AlarmInfo, DurableObject, ObjectHost
from dockyard.objects.storage import DurableObjectStorage
from tests.support.objects_helpers import wait_for

OLD_STATE_KEY = "__dockyard_container_state"


class Box(DurableObject):
    alarms: list[str] = []

    async def storage_of(self) -> DurableObjectStorage:
        return self.ctx.storage

    async def alarm(self, info: AlarmInfo) -> None:
        table = ScheduleTable(self.ctx.storage)
        for row in table.due(time.time()):
            Box.alarms.append(row.callback)
            table.delete(row.id)


@pytest.fixture
async def host(tmp_path: Path) -> Any:
    Box.alarms = []
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Box", Box)
        yield host


@pytest.fixture
async def storage(host: ObjectHost) -> DurableObjectStorage:
    return await host.namespace("Box").get_by_name("s").storage_of()


async def test_internal_keys_are_invisible_to_every_user_api(
    storage: DurableObjectStorage,
) -> None:
    internal = storage.internal
    assert internal.get("state") is None
    internal.put("state", {"status": "healthy", "at": 1.5})
    assert internal.get("state") == {"status": "healthy", "at": 1.5}
    assert await storage.list() == {}
    assert storage.kv.list() == {}
    assert await storage.get("state") is None
    assert await storage.delete("state") is False
    assert storage.kv.delete(["state"]) == 0
    await storage.put("user", 1)
    await storage.delete_all()
    assert internal.get("state") == {"status": "healthy", "at": 1.5}
    assert await storage.list() == {}
    # user SQL can neither read nor change the internal tables (it may still read its KV)
    ScheduleTable(storage)
    for statement in [
        "SELECT * FROM _dockyard_internal",
        "DELETE FROM _dockyard_internal",
        "DROP TABLE _dockyard_internal",
        "SELECT * FROM _dockyard_schedules",
    ]:
        with pytest.raises(StorageError, match="internal to Dockyard"):
            storage.sql.exec(statement)
    assert internal.delete("state") is True
    assert internal.delete("state") is False
    assert internal.get("state") is None


async def test_internal_writes_are_durable_and_transactional(
    host: ObjectHost, storage: DurableObjectStorage
) -> None:
    storage.internal.put("n", 1)

    def fail() -> None:
        storage.internal.put("n", 2)
        raise ValueError("rolled back")

    with pytest.raises(ValueError):
        storage.transaction_sync(fail)
    assert storage.internal.get("n") == 1
    with pytest.raises(StorageError, match="keys must be str"):
        storage.internal.put(1, 1)  # type: ignore[arg-type]
    with pytest.raises(StorageError, match="cannot store"):
        storage.internal.put("x", object())
    await host.stop()
    async with ObjectHost(host.state_dir, app="t") as again:
        again.set_class("Box", Box)
        reopened = await again.namespace("Box").get_by_name("s").storage_of()
        assert reopened.internal.get("n") == 1


async def test_internal_reads_create_no_file(storage: DurableObjectStorage) -> None:
    assert storage.internal.get("nothing") is None
    assert storage.internal.delete("nothing") is False
    assert not storage.path.exists()


async def test_a_user_key_named_like_the_old_internal_key_is_the_users_own(
    storage: DurableObjectStorage,
) -> None:
    storage.internal.put(OLD_STATE_KEY, {"status": "running"})
    await storage.put(OLD_STATE_KEY, "mine")
    assert await storage.get(OLD_STATE_KEY) == "mine"
    assert await storage.list() == {OLD_STATE_KEY: "mine"}
    assert storage.internal.get(OLD_STATE_KEY) == {"status": "running"}
    await storage.delete(OLD_STATE_KEY)
    assert storage.internal.get(OLD_STATE_KEY) == {"status": "running"}


async def test_schedules_survive_delete_all_and_the_alarm_still_fires(
    host: ObjectHost, storage: DurableObjectStorage
) -> None:
    table = ScheduleTable(storage)
    kept = table.add(3600, "later", {"a": 1})
    storage.sql.exec("CREATE TABLE mine (x)")
    await storage.delete_all()
    names = {r["name"] for r in storage.sql.exec("SELECT name FROM sqlite_master")}
    assert "mine" not in names
    assert table.get(kept.id) == kept
    assert [row.id for row in table.all()] == [kept.id]
    soon = table.add(0, "ping", None)
    assert [row.id for row in table.due(time.time())] == [soon.id]
    assert table.next_time() == soon.time
    await storage.set_alarm(datetime.now(UTC))
    await wait_for(lambda: Box.alarms == ["ping"])
    assert table.get(soon.id) is None and table.get(kept.id) == kept
    assert table.delete(kept.id) is True
    assert table.all() == []


async def test_schedules_are_not_user_tables(storage: DurableObjectStorage) -> None:
    ScheduleTable(storage).add(10, "cb", [1, 2])
    names = {r["name"] for r in storage.sql.exec("SELECT name FROM sqlite_master")}
    assert "container_schedules" not in names
    # a user table of the old name is the user's own
    storage.sql.exec("CREATE TABLE container_schedules (mine TEXT)")
    storage.sql.exec("INSERT INTO container_schedules VALUES ('x')")
    assert [row.callback for row in ScheduleTable(storage).all()] == ["cb"]
    assert storage.sql.exec("SELECT mine FROM container_schedules").to_array() == [{"mine": "x"}]


async def test_schedules_of_an_older_version_move_to_the_internal_table(
    storage: DurableObjectStorage,
) -> None:
    # what ScheduleTable created before schedules became internal
    storage.sql.exec(
        "CREATE TABLE container_schedules (id TEXT PRIMARY KEY, callback TEXT NOT NULL, "
        "payload TEXT, type TEXT NOT NULL, time REAL NOT NULL, delay REAL)"
    )
    storage.sql.exec(
        "INSERT INTO container_schedules VALUES ('a1', 'wake', '{\"x\": 1}', 'delayed', 5.0, 3.0)"
    )
    table = ScheduleTable(storage)
    (row,) = table.all()
    assert (row.id, row.callback, row.payload, row.time, row.delay_seconds) == (
        "a1",
        "wake",
        {"x": 1},
        5.0,
        3.0,
    )
    names = {r["name"] for r in storage.sql.exec("SELECT name FROM sqlite_master")}
    assert "container_schedules" not in names
    await storage.delete_all()
    assert [r.id for r in ScheduleTable(storage).all()] == ["a1"]


async def test_schedule_table_also_accepts_the_sql_api(storage: DurableObjectStorage) -> None:
    # the Container class of this release passes ctx.storage.sql
    added = ScheduleTable(storage.sql).add(1, "cb", None)
    assert ScheduleTable(storage).get(added.id) == added
    assert await storage.list() == {}


async def test_framework_code_hears_of_delete_all_and_can_set_the_alarm_again(
    storage: DurableObjectStorage,
) -> None:
    when = datetime(2999, 1, 1, tzinfo=UTC)
    seen: list[tuple[Any, float | None]] = []

    async def rearm() -> None:
        # internal state is still there; the alarm is gone (as Cloudflare's deleteAll)
        seen.append((storage.internal.get("kept"), await storage.get_alarm()))
        await storage.set_alarm(when)

    storage.internal.put("kept", 1.0)
    storage.internal.on_delete_all(rearm)
    await storage.set_alarm(datetime(2998, 1, 1, tzinfo=UTC))
    await storage.put("user", 1)
    await storage.delete_all()
    assert seen == [(1.0, None)]
    assert await storage.get_alarm() == when.timestamp() * 1000
    assert await storage.list() == {}
