"""``storage.internal``: Dockyard's own per-object state, apart from the user's.

Framework code (the container supervisor, schedules) keeps its state here, never in the
user's key space: it lives in the ``_dockyard_internal`` table, which no user API lists,
reads or deletes (``storage.list()``, ``get``, ``delete``, ``delete_all()``, ``kv.*``,
user SQL), so a user key of any name is the user's own. Reads and writes are synchronous
and a write is on disk when it returns, as everywhere in storage; inside a user
transaction they commit or roll back with it. Values are encoded as in ``codec``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from dockyard.errors import StorageError

from .codec import check_key, decode, encode, show_key
from .sql import Database, SqlCursor, SqlStorage

__all__ = ["InternalStore", "internal_store"]

MAX_VALUE_BYTES = 2 * 1024 * 1024


class InternalStore:
    """Internal keys of one object: ``get``, ``put``, ``delete``, and internal SQL."""

    __slots__ = ("_db", "_on_delete_all")

    def __init__(self, db: Database) -> None:
        self._db = db
        self._on_delete_all: list[Callable[[], Awaitable[None] | None]] = []

    def get(self, key: str) -> Any:
        """The value stored under ``key``, or None. Never creates the object's file."""
        check_key(key)
        if not self._db.exists():
            return None
        row = self._db.conn.execute(
            "SELECT value FROM _dockyard_internal WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else decode(row[0])

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key`` (durable when this returns)."""
        check_key(key)
        data = encode(value, key)
        if len(data) > MAX_VALUE_BYTES:
            raise StorageError(
                f"internal value for {show_key(key)} is {len(data)} bytes; at most "
                f"{MAX_VALUE_BYTES} bytes"
            )
        self._db.conn.execute(
            "INSERT OR REPLACE INTO _dockyard_internal (key, value) VALUES (?, ?)", (key, data)
        )

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed."""
        check_key(key)
        if not self._db.exists():
            return False
        cursor = self._db.conn.execute("DELETE FROM _dockyard_internal WHERE key = ?", (key,))
        return cursor.rowcount > 0

    def exec(self, query: str, *bindings: Any) -> SqlCursor:
        """Run Dockyard's own SQL (e.g. on a ``_dockyard_*`` table user SQL cannot touch)."""
        return self._db.run_internal(query, bindings)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Everything written inside commits together, or not at all on an exception."""
        savepoint = self._db.begin()
        try:
            yield
        except BaseException:
            self._db.rollback(savepoint)
            raise
        self._db.commit(savepoint)

    def exists(self) -> bool:
        """Whether the object's database file exists yet (reads never create it)."""
        return self._db.exists()

    def on_delete_all(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Call (and await, if async) ``callback()`` at the end of each user
        ``delete_all()``, which also drops the alarm, so framework code that relies on the
        alarm can set it again."""
        self._on_delete_all.append(callback)

    async def deleted_all(self) -> None:
        for callback in list(self._on_delete_all):
            result = callback()
            if inspect.isawaitable(result):
                await result


def internal_store(sql: SqlStorage) -> InternalStore:
    """The internal store of the object whose ``storage.sql`` this is."""
    return InternalStore(sql._db)
