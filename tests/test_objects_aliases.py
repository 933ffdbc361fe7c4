"""Cloudflare's camelCase names on storage and SQL, and rows readable as attributes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dockyard.objects import DurableObject, ObjectHost
from dockyard.objects.storage import DurableObjectStorage


class Box(DurableObject):
    async def storage_of(self) -> DurableObjectStorage:
        return self.ctx.storage


@pytest.fixture
async def storage(tmp_path: Path) -> Any:
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Box", Box)
        yield await host.namespace("Box").get_by_name("s").storage_of()


async def test_storage_camel_case_names(storage: DurableObjectStorage) -> None:
    await storage.put({"a": 1, "b": 2, "c": 3})
    assert list(await storage.list(startAfter="a")) == ["b", "c"]
    when = datetime(2999, 1, 1, tzinfo=UTC)
    await storage.setAlarm(when)
    assert await storage.getAlarm() == when.timestamp() * 1000
    await storage.deleteAlarm()
    assert await storage.getAlarm() is None
    assert storage.transactionSync(lambda: storage.kv.put("d", 4)) is None
    assert await storage.get("d") == 4
    await storage.setAlarm(when)
    await storage.deleteAll()
    assert await storage.list() == {} and await storage.getAlarm() is None


async def test_sql_cursor_camel_case_names_and_attribute_rows(
    storage: DurableObjectStorage,
) -> None:
    sql = storage.sql
    sql.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
    written = sql.exec("INSERT INTO t (name) VALUES (?), (?)", "a", "b")
    assert written.rowsWritten == 2
    cursor = sql.exec("SELECT id, name FROM t ORDER BY id")
    assert cursor.columnNames == ["id", "name"] and cursor.rowsRead == 2
    rows = cursor.toArray()
    assert rows == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert (rows[0].id, rows[0].name, rows[1]["name"]) == (1, "a", "b")
    with pytest.raises(AttributeError, match="no column 'nope'"):
        _ = rows[0].nope
    assert sql.exec("SELECT name FROM t WHERE id = 2").one().name == "b"
    assert [row.name for row in sql.exec("SELECT name FROM t")] == ["a", "b"]
    assert sql.databaseSize == sql.database_size > 0


async def test_namespace_camel_case_names(tmp_path: Path) -> None:
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Box", Box)
        ns = host.namespace("Box")
        named = ns.idFromName("a")
        assert named == ns.id_from_name("a")
        unique = ns.newUniqueId()
        assert ns.idFromString(str(unique)) == unique
        assert ns.getByName("a").id == named
        stub = ns.get(named, locationHint="enam")
        assert await stub.storage_of() is await ns.get_by_name("a").storage_of()
