"""D1 (``d1_databases``): Cloudflare's SQL database API over a local SQLite file.

``env.DB.prepare(sql).bind(*values)`` gives a statement with ``all()``, ``run()``,
``first(column=None)`` and ``raw(columnNames=False)``; ``env.DB.batch([...])`` runs
statements in one transaction; ``env.DB.exec(sql)`` runs several statements without
bindings. Results have Cloudflare's shape, readable as attributes or keys:
``{"results": [...], "success": True, "meta": {...}}``; rows are dicts whose columns are
also attributes (``row.author``). The file is ``.dockyard/d1/<database_name>.sqlite``,
shared with ``dockyard d1 execute --local``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dockyard.errors import BindingError

from ._sqlite import open_database
from .records import Record, RecordList

__all__ = [
    "D1Database",
    "D1PreparedStatement",
    "apply_migration",
    "pending_migrations",
    "split_statements",
]


def _error(error: sqlite3.Error) -> BindingError:
    code = getattr(error, "sqlite_errorname", "SQLITE_ERROR")
    return BindingError(f"D1_ERROR: {error}: {code}")


def _bind_value(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bytes):
        return int(value) if isinstance(value, bool) else value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise BindingError(
        f"D1_TYPE_ERROR: Type '{type(value).__name__}' not supported for value {value!r}"
    )


def split_statements(sql: str) -> list[str]:
    """Split SQL text into complete statements (a ";" inside a string or trigger stays)."""
    statements: list[str] = []
    current = ""
    for part in sql.split(";"):
        current += part + ";"
        if sqlite3.complete_statement(current):
            text = current.strip().rstrip(";").strip()
            if text and not _only_comments(text):
                statements.append(text)
            current = ""
    return statements


def _only_comments(text: str) -> bool:
    lines = [line.strip() for line in text.splitlines()]
    return all(not line or line.startswith("--") for line in lines)


class D1PreparedStatement:
    def __init__(self, db: D1Database, sql: str, params: tuple[Any, ...] = ()) -> None:
        self._db = db
        self.sql = sql
        self.params = params

    def __repr__(self) -> str:
        return f"<D1PreparedStatement {self.sql!r}>"

    def bind(self, *values: Any) -> D1PreparedStatement:
        return D1PreparedStatement(self._db, self.sql, tuple(_bind_value(v) for v in values))

    async def all(self) -> Record:
        return self._db.execute(self)

    async def run(self) -> Record:
        return self._db.execute(self)

    async def first(self, column: str | None = None) -> Any:
        result = self._db.execute(self)
        rows = result["results"]
        if not rows:
            return None
        if column is None:
            return rows[0]
        if column not in rows[0]:
            raise BindingError(f"D1_COLUMN_NOTFOUND: Column not found ({column})")
        return rows[0][column]

    async def raw(self, options: dict[str, Any] | None = None, **kwargs: Any) -> list[Any]:
        wanted = bool((options or {}).get("columnNames", kwargs.get("columnNames", False)))
        columns, rows, _ = self._db.run_statement(self)
        out: list[Any] = RecordList(RecordList(row) for row in rows)
        if wanted:
            out.insert(0, RecordList(columns))
        return out


class D1Database:
    """One D1 database binding."""

    def __init__(self, path: Path, *, name: str) -> None:
        self.path = path
        self.name = name
        self._conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<D1Database {self.name}>"

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            # D1 enforces foreign keys.
            self._conn = open_database(self.path, "PRAGMA foreign_keys=ON")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the API --------------------------------------------------------------------------

    def prepare(self, sql: str) -> D1PreparedStatement:
        return D1PreparedStatement(self, sql)

    async def batch(self, statements: Iterable[D1PreparedStatement]) -> RecordList:
        """Run every statement in one transaction; one error rolls all of them back."""
        conn = self.conn
        results = RecordList()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                results.append(self.execute(statement))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return results

    async def exec(self, sql: str) -> Record:
        """Run one or more statements (no bindings): ``{count, duration}``."""
        started = time.perf_counter()
        statements = split_statements(sql)
        for text in statements:
            self.run_statement(D1PreparedStatement(self, text))
        return Record(count=len(statements), duration=_ms(started))

    def with_session(self, *_args: Any) -> D1Database:
        """Sessions order reads across replicas; one local file needs none."""
        return self

    withSession = with_session

    # -- execution ------------------------------------------------------------------------

    def run_statement(
        self, statement: D1PreparedStatement
    ) -> tuple[list[str], list[tuple[Any, ...]], dict[str, Any]]:
        conn = self.conn
        before = conn.total_changes
        started = time.perf_counter()
        try:
            cursor = conn.execute(statement.sql, statement.params)
            rows = cursor.fetchall()
        except sqlite3.Error as error:
            raise _error(error) from None
        changes = conn.total_changes - before
        columns = [d[0] for d in cursor.description or ()]
        meta = {
            "served_by": "dockyard.d1",
            "served_by_region": "local",
            "served_by_primary": True,
            "timings": Record(sql_duration_ms=_ms(started)),
            "duration": _ms(started),
            "changes": changes,
            "last_row_id": cursor.lastrowid or 0,
            "changed_db": changes > 0,
            "size_after": self._size(),
            "rows_read": len(rows),
            "rows_written": changes,
        }
        return columns, rows, meta

    def execute(self, statement: D1PreparedStatement) -> Record:
        columns, rows, meta = self.run_statement(statement)
        results = RecordList(Record(zip(columns, row, strict=True)) for row in rows)
        return Record(results=results, success=True, meta=Record(meta))

    def _size(self) -> int:
        (pages,) = self.conn.execute("PRAGMA page_count").fetchone()
        (size,) = self.conn.execute("PRAGMA page_size").fetchone()
        return int(pages) * int(size)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


# -- migrations (`dockyard d1 migrations ...`) --------------------------------------------


def pending_migrations(db: D1Database, folder: Path, table: str) -> list[Path]:
    """The ``*.sql`` files of ``folder`` not yet recorded in ``table``, in name order."""
    files = sorted(folder.glob("*.sql")) if folder.is_dir() else []
    done = set(_applied(db, table))
    return [f for f in files if f.name not in done]


def _applied(db: D1Database, table: str) -> list[str]:
    quoted = _quote(table)
    db.conn.execute(
        f"CREATE TABLE IF NOT EXISTS {quoted} (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "name TEXT UNIQUE, applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL)"
    )
    return [row[0] for row in db.conn.execute(f"SELECT name FROM {quoted} ORDER BY id")]


def apply_migration(db: D1Database, file: Path, table: str) -> None:
    """Run one migration file and record it, in one transaction (all or nothing)."""
    conn = db.conn
    statements = split_statements(file.read_text(encoding="utf-8-sig"))
    conn.execute("BEGIN IMMEDIATE")
    try:
        for text in statements:
            conn.execute(text)
        conn.execute(f"INSERT INTO {_quote(table)} (name) VALUES (?)", (file.name,))
    except sqlite3.Error as error:
        conn.execute("ROLLBACK")
        raise BindingError(f"migration {file.name} failed: {_error(error)}") from None
    conn.execute("COMMIT")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
