from __future__ import annotations

import math
import sqlite3
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dockyard.errors import StorageError
from dockyard.objects import AlarmInfo, DurableObject, ObjectHost
from dockyard.objects.codec import decode, encode
from dockyard.objects.storage import DurableObjectStorage


class Box(DurableObject):
    async def storage_of(self) -> DurableObjectStorage:
        return self.ctx.storage

    async def alarm(self, info: AlarmInfo) -> None:
        pass


@pytest.fixture
async def host(tmp_path: Path) -> Any:
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Box", Box)
        yield host


@pytest.fixture
async def storage(host: ObjectHost) -> DurableObjectStorage:
    return await host.namespace("Box").get_by_name("s").storage_of()


hashables = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.datetimes()
    | st.datetimes(timezones=st.just(UTC))
)
values = st.recursive(
    hashables | st.sets(hashables, max_size=5),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(values)
def test_codec_round_trips_every_supported_type(value: Any) -> None:
    assert decode(encode(value, "k")) == value


def test_codec_keeps_types_and_tag_like_dicts() -> None:
    for value in [True, 1, 1.0, b"\x00", {"$b": "AA=="}, {"$d": {"$b": 1}}, 10**40]:
        back = decode(encode(value, "k"))
        assert back == value and type(back) is type(value)
    assert math.isnan(decode(encode(float("nan"), "k")))


def test_codec_keeps_what_structured_clone_keeps() -> None:
    aware = datetime(2026, 11, 28, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5)))
    naive = datetime(1999, 12, 31, 23, 59, 59)
    huge = 7**20000  # far beyond the 4,300 digits Python turns into JSON text
    for value in [
        aware,
        naive,
        {1, "a", b"b", None, 2.5, naive},
        set(),
        huge,
        -huge,
        2**64,
        "lone \ud800 surrogate",
        {"when": [aware], "tags": {"x"}, "$t": "not a tag"},
    ]:
        back = decode(encode(value, "k"))
        assert back == value and type(back) is type(value)
    assert decode(encode(aware, "k")).utcoffset() == timedelta(hours=5)
    assert decode(encode(naive, "k")).tzinfo is None


@pytest.mark.parametrize(
    "bad", [(1, 2), frozenset({1}), object(), {1: "x"}, [date(2026, 1, 1)], {(1, 2)}]
)
def test_codec_refuses_other_types_naming_type_and_key(bad: Any) -> None:
    with pytest.raises(StorageError, match=r"'my-key'") as info:
        encode(bad, "my-key")
    assert (
        type(bad).__name__ in str(info.value)
        or "dict key" in str(info.value)
        or "date" in str(info.value)
        or "tuple" in str(info.value)
    )
    assert "datetime" in str(info.value) or "dict key" in str(info.value)


async def test_kv_get_put_delete(storage: DurableObjectStorage) -> None:
    assert await storage.get("missing") is None
    await storage.put("a", {"n": [1, 2.5, None, True, b"raw"]})
    assert await storage.get("a") == {"n": [1, 2.5, None, True, b"raw"]}
    await storage.put({"b": 2, "c": "three"})
    assert await storage.get(["c", "a", "zz", "b"]) == {
        "a": {"n": [1, 2.5, None, True, b"raw"]},
        "b": 2,
        "c": "three",
    }
    assert list(await storage.get(["c", "b"])) == ["b", "c"]
    await storage.put("none", None)
    assert await storage.list(prefix="none") == {"none": None}
    assert await storage.delete("a") is True
    assert await storage.delete("a") is False
    assert await storage.delete(["b", "c", "nope"]) == 2
    await storage.delete_all()
    assert await storage.list() == {}


async def test_kv_list_options(storage: DurableObjectStorage) -> None:
    await storage.put({k: i for i, k in enumerate(["a", "b", "ba", "bb", "c", "é", "\U0010ffff"])})
    assert list(await storage.list()) == ["a", "b", "ba", "bb", "c", "é", "\U0010ffff"]
    assert list(await storage.list(prefix="b")) == ["b", "ba", "bb"]
    assert list(await storage.list(start="b", end="c")) == ["b", "ba", "bb"]
    assert list(await storage.list(start_after="b", end="c")) == ["ba", "bb"]
    assert list(await storage.list(reverse=True, limit=2)) == ["\U0010ffff", "é"]
    assert list(await storage.list(prefix="b", reverse=True, limit=2)) == ["bb", "ba"]
    with pytest.raises(StorageError, match="limit"):
        await storage.list(limit=0)


async def test_kv_limits_and_bad_arguments(storage: DurableObjectStorage) -> None:
    await storage.put("k" * 2048, 1)
    with pytest.raises(StorageError, match="at most 2048 bytes"):
        await storage.put("k" * 2049, 1)
    # the limit applies to the encoded value (a str: its JSON; bytes: base64)
    await storage.put("big", "x" * (2 * 1024 * 1024 - 10))
    with pytest.raises(StorageError, match="2 MiB"):
        await storage.put("big", "x" * (2 * 1024 * 1024))
    with pytest.raises(StorageError, match="2 MiB"):
        await storage.put("big", b"x" * (1600 * 1024))
    with pytest.raises(StorageError, match="keys must be str"):
        await storage.put(1, 1)  # type: ignore[arg-type]
    with pytest.raises(StorageError, match="needs a value"):
        await storage.put("x")
    with pytest.raises(StorageError, match=r"tuple.*'s'"):
        await storage.put("s", (1,))
    with pytest.raises(StorageError, match="lone surrogate"):
        await storage.put("\udc80", 1)
    # a refused entry in a batch writes nothing
    with pytest.raises(StorageError):
        await storage.put({"ok": 1, "bad": object()})
    assert await storage.get("ok") is None


async def test_reads_do_not_create_a_file(storage: DurableObjectStorage) -> None:
    assert await storage.get("x") is None and await storage.list() == {}
    assert storage.sql.database_size == 0
    assert not storage.path.exists()
    await storage.put("x", 1)
    assert storage.path.exists() and storage.sql.database_size > 0


async def test_sql_exec_and_cursor(storage: DurableObjectStorage) -> None:
    sql = storage.sql
    created = sql.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
    assert created.to_array() == []
    inserted = sql.exec("INSERT INTO t (name) VALUES (?), (?), (?)", "a", "b", "c")
    assert inserted.rows_written == 3
    cursor = sql.exec("SELECT id, name FROM t ORDER BY id")
    assert cursor.column_names == ["id", "name"]
    assert cursor.rows_read == 3
    assert next(cursor) == {"id": 1, "name": "a"}
    assert cursor.to_array() == [{"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    assert list(sql.exec("SELECT name FROM t WHERE id > ?", 1).raw()) == [("b",), ("c",)]
    assert sql.exec("SELECT count(*) AS n FROM t").one() == {"n": 3}
    with pytest.raises(StorageError, match=r"exactly one row.*returned 3"):
        sql.exec("SELECT * FROM t").one()
    with pytest.raises(StorageError, match=r"exactly one row.*returned 0"):
        sql.exec("SELECT * FROM t WHERE id = 99").one()
    with pytest.raises(StorageError, match="SQL error: no such table"):
        sql.exec("SELECT * FROM nope")
    with pytest.raises(StorageError, match="SQL error"):
        sql.exec("SELEC 1")
    assert sql.database_size > 0


async def test_kv_table_is_visible_but_protected(storage: DurableObjectStorage) -> None:
    await storage.put("k", "v")
    assert storage.sql.exec("SELECT key FROM _dockyard_kv").to_array() == [{"key": "k"}]
    for statement in [
        "DELETE FROM _dockyard_kv",
        "UPDATE _dockyard_kv SET value = x'00'",
        "INSERT INTO _dockyard_kv VALUES ('a', x'00')",
        "DROP TABLE _dockyard_kv",
        "ALTER TABLE _dockyard_kv ADD COLUMN c",
        "CREATE TABLE _dockyard_mine (x)",
        "CREATE INDEX i ON _dockyard_kv (value)",
        # the exact text of an internal statement must not borrow its authorization
        "INSERT OR REPLACE INTO _dockyard_kv (key, value) VALUES (?, ?)",
    ]:
        args = ("k", b"x") if "?" in statement else ()
        with pytest.raises(StorageError, match="internal to Dockyard"):
            storage.sql.exec(statement, *args)
    assert await storage.get("k") == "v"
    with pytest.raises(StorageError, match="durability"):
        storage.sql.exec("PRAGMA synchronous=OFF")
    with pytest.raises(StorageError, match="ATTACH"):
        storage.sql.exec("ATTACH DATABASE ':memory:' AS other")


@pytest.mark.parametrize(
    "statement",
    ["BEGIN", "BEGIN IMMEDIATE", "COMMIT", "ROLLBACK", "SAVEPOINT a", "RELEASE a", "END"],
)
async def test_sql_refuses_transaction_control(
    storage: DurableObjectStorage, statement: str
) -> None:
    with pytest.raises(StorageError, match=r"transaction_sync\(fn\).*transaction\(fn\)"):
        storage.sql.exec(statement)


async def test_transaction_sync_commits_or_rolls_back(storage: DurableObjectStorage) -> None:
    storage.sql.exec("CREATE TABLE t (x INTEGER)")

    def good() -> int:
        storage.sql.exec("INSERT INTO t VALUES (1)")
        storage.kv.put("k", 1)
        return 7

    assert storage.transaction_sync(good) == 7

    def bad() -> None:
        storage.sql.exec("INSERT INTO t VALUES (2)")
        storage.kv.put("k", 2)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        storage.transaction_sync(bad)
    assert storage.sql.exec("SELECT x FROM t").to_array() == [{"x": 1}]
    assert await storage.get("k") == 1

    def nested() -> None:
        storage.kv.put("n", 1)
        with pytest.raises(RuntimeError):
            storage.transaction_sync(lambda: (storage.kv.put("n", 2), _raise()))
        storage.kv.put("m", storage.kv.get("n"))

    storage.transaction_sync(nested)
    assert await storage.get(["n", "m"]) == {"m": 1, "n": 1}

    async def not_sync() -> None:
        storage.kv.put("z", 1)

    with pytest.raises(StorageError, match=r"await storage\.transaction"):
        storage.transaction_sync(not_sync)  # type: ignore[arg-type]
    assert await storage.get("z") is None


def _raise() -> None:
    raise RuntimeError("inner")


async def test_async_transaction(storage: DurableObjectStorage) -> None:
    async def ok(txn: DurableObjectStorage) -> str:
        await txn.put("a", 1)
        await txn.put("b", 2)
        return "done"

    assert await storage.transaction(ok) == "done"

    async def fail(txn: DurableObjectStorage) -> None:
        await txn.put("a", 100)
        await txn.delete("b")
        raise KeyError("nope")

    with pytest.raises(KeyError):
        await storage.transaction(fail)
    assert await storage.get(["a", "b"]) == {"a": 1, "b": 2}


async def test_writes_are_on_disk_when_they_return(storage: DurableObjectStorage) -> None:
    await storage.put("durable", [1, 2])
    storage.sql.exec("CREATE TABLE t (x)")
    storage.sql.exec("INSERT INTO t VALUES (42)")
    # a second, independent connection sees every acknowledged write
    other = sqlite3.connect(storage.path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        (value,) = other.execute("SELECT value FROM _dockyard_kv WHERE key='durable'").fetchone()
        assert decode(value) == [1, 2]
        assert other.execute("SELECT x FROM t").fetchall() == [(42,)]
    finally:
        other.close()
    assert storage.sql.exec("PRAGMA synchronous").one() == {"synchronous": 2}  # FULL


async def test_delete_all_drops_user_tables_and_alarm(storage: DurableObjectStorage) -> None:
    storage.sql.exec("CREATE TABLE t (x)")
    storage.sql.exec("CREATE VIEW v AS SELECT x FROM t")
    await storage.put("k", 1)
    await storage.set_alarm(datetime(2999, 1, 1, tzinfo=UTC))
    await storage.delete_all()
    names = [r["name"] for r in storage.sql.exec("SELECT name FROM sqlite_master")]
    assert "t" not in names and "v" not in names and "_dockyard_kv" in names
    assert await storage.get_alarm() is None
    assert await storage.list() == {}


async def test_alarm_api(storage: DurableObjectStorage) -> None:
    assert await storage.get_alarm() is None
    await storage.set_alarm(datetime(2999, 1, 1, tzinfo=UTC))
    assert await storage.get_alarm() == datetime(2999, 1, 1, tzinfo=UTC).timestamp() * 1000
    await storage.set_alarm(32503680000000)
    assert await storage.get_alarm() == 32503680000000
    await storage.delete_alarm()
    assert await storage.get_alarm() is None
    with pytest.raises(StorageError, match="epoch milliseconds"):
        await storage.set_alarm("soon")  # type: ignore[arg-type]


async def test_lone_surrogates_in_sql_are_a_storage_error(storage: DurableObjectStorage) -> None:
    with pytest.raises(StorageError, match="lone surrogate"):
        storage.sql.exec("SELECT ?", "bad \ud800")
    with pytest.raises(StorageError, match="lone surrogate"):
        storage.sql.exec("SELECT '\udfff'")
    with pytest.raises(StorageError, match="lone surrogate"):
        await storage.list(prefix="\ud800")
    # a value may hold one: it round-trips
    await storage.put("k", "a\ud800b")
    assert await storage.get("k") == "a\ud800b"
