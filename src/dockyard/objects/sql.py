"""One object's SQLite file: the connection, its guards, and the synchronous SQL API.

The file opens lazily (an object that never writes never gets a file) in WAL mode with
``synchronous=FULL`` and autocommit, so every statement outside an explicit transaction
is on disk when ``exec`` returns.

User SQL runs under an SQLite authorizer that refuses transaction control (use
``storage.transaction_sync`` / ``storage.transaction``), ATTACH/DETACH, durability
pragmas, and any write or schema change touching a ``_dockyard_`` table. Reading the
internal tables (e.g. ``SELECT * FROM _dockyard_kv``) is allowed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dockyard.errors import StorageError

__all__ = ["INTERNAL_PREFIX", "Database", "SqlCursor", "SqlStorage"]

INTERNAL_PREFIX = "_dockyard_"
# User statements get this prefix so SQLite's statement cache never hands a user query a
# statement that was prepared (and authorized) as an internal one with the same text.
_USER_MARK = "/*user*/ "
_MAX_SHOWN = 120

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS _dockyard_kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) "
    "WITHOUT ROWID"
)
_TRANSACTION_HINT = (
    "is not allowed in sql.exec(): use storage.transaction_sync(fn) or "
    "await storage.transaction(fn)"
)
_GUARDED_PRAGMAS = {"journal_mode", "synchronous", "locking_mode", "writable_schema"}
_READ_ACTIONS = {
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}


def _refusal(action: int, arg1: str | None, arg2: str | None) -> str | None:
    if action == sqlite3.SQLITE_TRANSACTION:
        return f"{arg1 or 'transaction control'} {_TRANSACTION_HINT}"
    if action == sqlite3.SQLITE_SAVEPOINT:
        verb = "SAVEPOINT" if arg1 == "BEGIN" else f"{arg1} (savepoint)"
        return f"{verb} {_TRANSACTION_HINT}"
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return "ATTACH and DETACH are not allowed in sql.exec()"
    if action == sqlite3.SQLITE_PRAGMA:
        if (arg1 or "").lower() in _GUARDED_PRAGMAS and arg2 is not None:
            return f"PRAGMA {arg1} cannot be changed: storage durability depends on it"
        return None
    if action in _READ_ACTIONS:
        return None
    for name in (arg1, arg2):
        if name and name.lower().startswith(INTERNAL_PREFIX):
            return (
                f"{name} is internal to Dockyard: user SQL may read it but not write or "
                f"alter it (tables named {INTERNAL_PREFIX}* are reserved)"
            )
    return None


def _shown(query: str) -> str:
    query = " ".join(query.split())
    return query if len(query) <= _MAX_SHOWN else query[: _MAX_SHOWN - 3] + "..."


class Database:
    """The lazily opened SQLite connection of one object."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._user = False
        self._refused: str | None = None
        self._savepoints = 0
        self.closed = False

    def exists(self) -> bool:
        return self._conn is not None or self.path.exists()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.closed:
                raise StorageError(
                    f"storage {self.path.name} is closed: the object was reset, evicted or "
                    f"its host stopped"
                )
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # timeout=0: a second connection (an instance being retired) never blocks the loop.
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=0.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(_SCHEMA)
        except sqlite3.Error as error:
            conn.close()
            raise StorageError(f"cannot open storage {self.path}: {error}") from error
        conn.set_authorizer(self._authorize)
        return conn

    def close(self) -> None:
        self.closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _authorize(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        if not self._user:
            return sqlite3.SQLITE_OK
        reason = _refusal(action, arg1, arg2)
        if reason is None:
            return sqlite3.SQLITE_OK
        self._refused = reason
        return sqlite3.SQLITE_DENY

    def run_user(self, query: str, bindings: tuple[Any, ...]) -> SqlCursor:
        conn = self.conn
        before = conn.total_changes
        self._user, self._refused = True, None
        try:
            cursor = conn.execute(_USER_MARK + query, bindings)
            rows = cursor.fetchall()
        except sqlite3.Error as error:
            if self._refused is not None:
                raise StorageError(f"{self._refused} (in {_shown(query)!r})") from None
            raise StorageError(f"SQL error: {error} (in {_shown(query)!r})") from error
        finally:
            self._user = False
        columns = [d[0] for d in cursor.description or ()]
        return SqlCursor(columns, rows, conn.total_changes - before)

    def begin(self) -> str | None:
        """Open a transaction, or a savepoint inside one; returns the savepoint name."""
        conn = self.conn
        if conn.in_transaction:
            self._savepoints += 1
            name = f"_dockyard_sp{self._savepoints}"
            conn.execute(f"SAVEPOINT {name}")
            return name
        conn.execute("BEGIN IMMEDIATE")
        return None

    def commit(self, savepoint: str | None) -> None:
        if savepoint is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute(f"RELEASE {savepoint}")

    def rollback(self, savepoint: str | None) -> None:
        if self._conn is None:
            return
        if savepoint is None:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        else:
            self._conn.execute(f"ROLLBACK TO {savepoint}")
            self._conn.execute(f"RELEASE {savepoint}")


class SqlCursor:
    """The result of one ``sql.exec``: an iterator of dict rows, consumed once.

    ``rows_read`` counts the rows returned (SQLite's scan counters are not reachable from
    Python); ``rows_written`` counts rows inserted, updated or deleted.
    """

    def __init__(self, columns: list[str], rows: list[tuple[Any, ...]], written: int) -> None:
        self.column_names = columns
        self._rows = rows
        self._next = 0
        self.rows_read = len(rows)
        self.rows_written = written

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._next >= len(self._rows):
            raise StopIteration
        row = self._rows[self._next]
        self._next += 1
        return dict(zip(self.column_names, row, strict=True))

    def to_array(self) -> list[dict[str, Any]]:
        return list(self)

    def raw(self) -> Iterator[tuple[Any, ...]]:
        rows, self._next = self._rows[self._next :], len(self._rows)
        return iter(rows)

    def one(self) -> dict[str, Any]:
        rows = self.to_array()
        if len(rows) != 1:
            raise StorageError(f"expected exactly one row, the query returned {len(rows)}")
        return rows[0]


class SqlStorage:
    """``storage.sql``: synchronous SQL on the object's own SQLite database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def exec(self, query: str, *bindings: Any) -> SqlCursor:
        return self._db.run_user(query, bindings)

    @property
    def database_size(self) -> int:
        if not self._db.exists():
            return 0
        conn = self._db.conn
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
        return int(pages) * int(size)
