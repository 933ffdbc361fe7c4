"""``ctx.storage``: the key-value API, transactions and the alarm of one object.

Every method does its SQLite work synchronously, even the ``async`` ones: they never
yield to the event loop, so ``v = await storage.get("n"); await storage.put("n", v + 1)``
cannot interleave with another call (Cloudflare's input gate). Every write is committed
with ``synchronous=FULL`` before it returns (the output gate): a response that follows
an acknowledged write can never outlive it in a crash.

Keys are ``str`` of at most 2 KiB (UTF-8); key plus encoded value are at most 2 MiB.
Values are encoded as described in ``dockyard.objects.codec``. ``storage.internal``
holds Dockyard's own state apart from the user's keys (see ``internal``). Cloudflare's
camelCase names (``deleteAll``, ``getAlarm``, ``setAlarm``, ``deleteAlarm``,
``transactionSync``) are aliases of the snake_case methods.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from dockyard.errors import StorageError

from .alarms import AlarmSlot
from .codec import check_key, decode, encode, show_key
from .internal import InternalStore
from .sql import INTERNAL_PREFIX, Database, OpenFiles, SqlStorage

__all__ = ["DurableObjectStorage", "KeyValueStore"]

T = TypeVar("T")
MAX_ENTRY_BYTES = 2 * 1024 * 1024
_MISSING: Any = object()


def _entry(key: str, value: Any) -> tuple[str, bytes]:
    size = len(check_key(key))
    data = encode(value, key)
    if size + len(data) > MAX_ENTRY_BYTES:
        raise StorageError(
            f"key {show_key(key)} with its value is {size + len(data)} bytes; key + value are "
            f"at most {MAX_ENTRY_BYTES} bytes (2 MiB)"
        )
    return key, data


def _keys(keys: Iterable[str]) -> list[str]:
    if isinstance(keys, str | bytes):
        raise StorageError("pass one key as a str or several keys as a list")
    out = list(keys)
    for key in out:
        check_key(key)
    return out


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            return prefix[:-1] + chr(nxt)
        prefix = prefix[:-1]
    return None


class KeyValueStore:
    """``storage.kv``: the synchronous key-value API (the async one wraps it)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _write(self) -> contextlib.AbstractContextManager[None]:
        db = self._db

        @contextlib.contextmanager
        def scope() -> Any:
            savepoint = db.begin()
            try:
                yield
            except BaseException:
                db.rollback(savepoint)
                raise
            db.commit(savepoint)

        return scope()

    def get(self, key: str | Iterable[str]) -> Any:
        if isinstance(key, str):
            check_key(key)
            if not self._db.exists():
                return None
            row = self._db.conn.execute(
                "SELECT value FROM _dockyard_kv WHERE key = ?", (key,)
            ).fetchone()
            return None if row is None else decode(row[0])
        keys = _keys(key)
        if not keys or not self._db.exists():
            return {}
        marks = ",".join("?" * len(keys))
        rows = self._db.conn.execute(
            f"SELECT key, value FROM _dockyard_kv WHERE key IN ({marks}) ORDER BY key", keys
        )
        return {k: decode(v) for k, v in rows}

    def put(self, key: str | Mapping[str, Any], value: Any = _MISSING) -> None:
        if isinstance(key, Mapping):
            if value is not _MISSING:
                raise StorageError("put(entries) takes a dict of entries and no value")
            entries = [_entry(k, v) for k, v in key.items()]
        elif value is _MISSING:
            raise StorageError(f"put({show_key(str(key))}) needs a value")
        else:
            entries = [_entry(key, value)]
        if not entries:
            return
        insert = "INSERT OR REPLACE INTO _dockyard_kv (key, value) VALUES (?, ?)"
        if len(entries) == 1 and not self._db.conn.in_transaction:
            self._db.conn.execute(insert, entries[0])
            return
        with self._write():
            self._db.conn.executemany(insert, entries)

    def delete(self, key: str | Iterable[str]) -> bool | int:
        if isinstance(key, str):
            check_key(key)
            if not self._db.exists():
                return False
            cursor = self._db.conn.execute("DELETE FROM _dockyard_kv WHERE key = ?", (key,))
            return cursor.rowcount > 0
        keys = _keys(key)
        if not keys or not self._db.exists():
            return 0
        marks = ",".join("?" * len(keys))
        cursor = self._db.conn.execute(f"DELETE FROM _dockyard_kv WHERE key IN ({marks})", keys)
        return cursor.rowcount

    def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        start_after: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> dict[str, Any]:
        where: list[str] = []
        args: list[Any] = []
        for bound, op in ((start, ">="), (start_after, ">"), (end, "<"), (prefix, ">=")):
            if bound is not None:
                check_key(bound)
                where.append(f"key {op} ?")
                args.append(bound)
        if prefix:
            upper = _prefix_end(prefix)
            if upper is not None:
                where.append("key < ?")
                args.append(upper)
        if limit is not None and (type(limit) is not int or limit < 1):
            raise StorageError(f"list(limit=...) must be a positive int, got {limit!r}")
        if not self._db.exists():
            return {}
        sql = "SELECT key, value FROM _dockyard_kv"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY key DESC" if reverse else " ORDER BY key"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return {k: decode(v) for k, v in self._db.conn.execute(sql, args)}

    def delete_all_data(self) -> None:
        """Drop every key and every user table and view; the other internal tables stay."""
        if not self._db.exists():
            return
        conn = self._db.conn
        with self._write():
            conn.execute("DELETE FROM _dockyard_kv")
            objects = conn.execute(
                "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view') "
                "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
            ).fetchall()
            for kind, name in objects:
                if not name.startswith(INTERNAL_PREFIX):
                    quoted = name.replace('"', '""')
                    conn.execute(f'DROP {kind.upper()} IF EXISTS "{quoted}"')


def _epoch_ms(when: float | datetime) -> float:
    if isinstance(when, datetime):
        return when.timestamp() * 1000
    if type(when) in (int, float):
        return float(when)
    raise StorageError(
        f"set_alarm() takes epoch milliseconds (int or float) or a datetime, "
        f"got {type(when).__name__}"
    )


class DurableObjectStorage:
    """The storage of one object: async KV, ``kv`` (sync), ``sql``, transactions, alarm."""

    def __init__(
        self,
        path: Path,
        alarm: AlarmSlot,
        hold: Callable[[], AbstractAsyncContextManager[None]] | None = None,
        open_files: OpenFiles | None = None,
    ) -> None:
        self._db = Database(path, open_files)
        self._alarm = alarm
        self._hold = hold
        self.kv = KeyValueStore(self._db)
        self.sql = SqlStorage(self._db)
        self.internal = InternalStore(self._db)

    @property
    def path(self) -> Path:
        return self._db.path

    @property
    def closed(self) -> bool:
        return self._db.closed

    def close(self) -> None:
        self._db.close()

    # -- key-value --------------------------------------------------------------------

    async def get(self, key: str | Iterable[str]) -> Any:
        return self.kv.get(key)

    async def put(self, key: str | Mapping[str, Any], value: Any = _MISSING) -> None:
        self.kv.put(key, value)

    async def delete(self, key: str | Iterable[str]) -> bool | int:
        return self.kv.delete(key)

    async def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        start_after: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
        startAfter: str | None = None,  # Cloudflare's spelling of start_after
    ) -> dict[str, Any]:
        if startAfter is not None:
            if start_after is not None:
                raise StorageError("list(): give start_after or startAfter, not both")
            start_after = startAfter
        return self.kv.list(
            prefix=prefix,
            start=start,
            start_after=start_after,
            end=end,
            reverse=reverse,
            limit=limit,
        )

    async def delete_all(self) -> None:
        """Delete every key, every user SQL table and the alarm (``storage.internal`` and
        other internal tables stay)."""
        self.kv.delete_all_data()
        self._alarm.delete()
        await self.internal.deleted_all()

    async def sync(self) -> None:
        """Writes are durable when they return; nothing is left to wait for."""

    # -- transactions -----------------------------------------------------------------

    def transaction_sync(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` in one transaction: all its writes commit, or none on an exception."""
        savepoint = self._db.begin()
        try:
            result = fn()
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise StorageError(
                    "transaction_sync() takes a synchronous function; for an async one use "
                    "await storage.transaction(fn)"
                )
        except BaseException:
            self._db.rollback(savepoint)
            raise
        self._db.commit(savepoint)
        return result

    async def transaction(self, fn: Callable[[DurableObjectStorage], Awaitable[T]]) -> T:
        """Run ``await fn(txn)`` in one transaction, rolled back if it raises.

        While it runs no other call is delivered to the object (its writes would
        otherwise join this transaction). ``txn`` is this storage.
        """
        hold = self._hold() if self._hold is not None else contextlib.nullcontext()
        async with hold:
            savepoint = self._db.begin()
            try:
                result = await fn(self)
            except BaseException:
                self._db.rollback(savepoint)
                raise
            self._db.commit(savepoint)
            return result

    # -- alarm ------------------------------------------------------------------------

    async def get_alarm(self) -> float | None:
        """The alarm time in epoch milliseconds, or None."""
        return self._alarm.get()

    async def set_alarm(self, when: float | datetime) -> None:
        self._alarm.set(_epoch_ms(when))

    async def delete_alarm(self) -> None:
        self._alarm.delete()

    # -- Cloudflare's spelling ----------------------------------------------------------

    deleteAll = delete_all
    transactionSync = transaction_sync
    getAlarm = get_alarm
    setAlarm = set_alarm
    deleteAlarm = delete_alarm
