"""One object's SQLite file: the connection, its guards, and the synchronous SQL API.

The file opens lazily (an object that never writes never gets a file) in WAL mode with
``synchronous=FULL`` and autocommit, so every statement outside an explicit transaction
is on disk when ``exec`` returns. Files are created 0600 in folders made 0700 (SQLite
gives the ``-wal`` and ``-shm`` files the mode of the database file).

User SQL runs under an SQLite authorizer that refuses transaction control (use
``storage.transaction_sync`` / ``storage.transaction``), ATTACH/DETACH, durability
pragmas, and any write or schema change touching a ``_dockyard_`` table. Of the internal
tables, user SQL may read only ``_dockyard_kv`` (the user's own keys); the others hold
Dockyard's state (``storage.internal``, container schedules) and stay out of reach.

Open connections are bounded by ``files.OpenFiles``: an idle one may be closed, and
reopens on its next use.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dockyard.errors import StorageError

from .files import OpenFiles, default_open_files, private_dir, private_file

__all__ = [
    "INTERNAL_PREFIX",
    "Database",
    "OpenFiles",
    "SqlCursor",
    "SqlRow",
    "SqlStorage",
    "default_open_files",
]

INTERNAL_PREFIX = "_dockyard_"
# The one internal table user SQL may read: it holds the user's own KV data.
USER_READABLE = "_dockyard_kv"
# User statements get this prefix so SQLite's statement cache never hands a user query a
# statement that was prepared (and authorized) as an internal one with the same text.
_USER_MARK = "/*user*/ "
_MAX_SHOWN = 120

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS _dockyard_kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) "
    "WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS _dockyard_internal (key TEXT PRIMARY KEY, value BLOB NOT NULL) "
    "WITHOUT ROWID",
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
    if action == sqlite3.SQLITE_READ:
        table = (arg1 or "").lower()
        if table.startswith(INTERNAL_PREFIX) and table != USER_READABLE:
            return (
                f"{arg1} is internal to Dockyard: user SQL cannot read it (of the "
                f"{INTERNAL_PREFIX}* tables only {USER_READABLE} is readable)"
            )
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
    """The lazily opened SQLite connection of one object (reopened after an idle close)."""

    def __init__(self, path: Path, files: OpenFiles | None = None) -> None:
        self.path = path
        self._files = default_open_files if files is None else files
        self._conn: sqlite3.Connection | None = None
        self._user = False
        self._refused: str | None = None
        self._savepoints = 0
        self.closed = False

    def exists(self) -> bool:
        return self._conn is not None or self.path.exists()

    @property
    def conn(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            if self.closed:
                raise StorageError(
                    f"storage {self.path.name} is closed: the object was reset, evicted or "
                    f"its host stopped"
                )
            conn = self._conn = self._open()
            self._files.opened(self)
        else:
            self._files.touch(self)
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            private_dir(self.path.parent)
            private_file(self.path)
        except OSError as error:
            raise StorageError(f"cannot open storage {self.path}: {error}") from error
        # timeout=0: a second connection (an instance being retired) never blocks the loop.
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=0.0)
        except sqlite3.Error as error:
            raise StorageError(f"cannot open storage {self.path}: {error}") from error
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                conn.execute(statement)
        except sqlite3.Error as error:
            conn.close()
            raise StorageError(f"cannot open storage {self.path}: {error}") from error
        conn.set_authorizer(self._authorize)
        return conn

    def release_idle(self) -> bool:
        """Close the connection if no transaction is open on it; it reopens on next use."""
        conn = self._conn
        if conn is None or conn.in_transaction:
            return False
        self._conn = None
        self._files.closed(self)
        conn.close()
        return True

    def close(self) -> None:
        self.closed = True
        if self._conn is not None:
            self._files.closed(self)
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
        except UnicodeEncodeError as error:
            raise StorageError(
                f"SQL text and bound strings must be valid Unicode (a lone surrogate at "
                f"position {error.start}?) (in {_shown(query)!r})"
            ) from None
        finally:
            self._user = False
        columns = [d[0] for d in cursor.description or ()]
        return SqlCursor(columns, rows, conn.total_changes - before)

    def run_internal(self, query: str, bindings: tuple[Any, ...] = ()) -> SqlCursor:
        """Dockyard's own SQL: no authorizer limits, errors still become StorageError."""
        conn = self.conn
        before = conn.total_changes
        try:
            cursor = conn.execute(query, bindings)
            rows = cursor.fetchall()
        except sqlite3.Error as error:
            raise StorageError(f"SQL error: {error} (in {_shown(query)!r})") from error
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


class SqlRow(dict[str, Any]):
    """One result row: a dict (``row["name"]``) whose columns also read as attributes."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the row has no column {name!r}") from None


class SqlCursor:
    """The result of one ``sql.exec``: an iterator of rows (``SqlRow``), consumed once.

    ``rows_read`` counts the rows returned (SQLite's scan counters are not reachable from
    Python); ``rows_written`` counts rows inserted, updated or deleted. Cloudflare's names
    (``toArray``, ``columnNames``, ``rowsRead``, ``rowsWritten``) are aliases.
    """

    def __init__(self, columns: list[str], rows: list[tuple[Any, ...]], written: int) -> None:
        self.column_names = columns
        self._rows = rows
        self._next = 0
        self.rows_read = len(rows)
        self.rows_written = written

    def __iter__(self) -> Iterator[SqlRow]:
        return self

    def __next__(self) -> SqlRow:
        if self._next >= len(self._rows):
            raise StopIteration
        row = self._rows[self._next]
        self._next += 1
        return SqlRow(zip(self.column_names, row, strict=True))

    def to_array(self) -> list[SqlRow]:
        return list(self)

    def raw(self) -> Iterator[tuple[Any, ...]]:
        rows, self._next = self._rows[self._next :], len(self._rows)
        return iter(rows)

    def one(self) -> SqlRow:
        rows = self.to_array()
        if len(rows) != 1:
            raise StorageError(f"expected exactly one row, the query returned {len(rows)}")
        return rows[0]

    # Cloudflare's spelling.
    toArray = to_array

    @property
    def columnNames(self) -> list[str]:
        return self.column_names

    @property
    def rowsRead(self) -> int:
        return self.rows_read

    @property
    def rowsWritten(self) -> int:
        return self.rows_written


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

    @property
    def databaseSize(self) -> int:
        return self.database_size
