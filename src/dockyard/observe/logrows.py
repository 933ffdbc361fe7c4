"""How the log store lays records out in SQLite: the schema, a record or a batch of lines
as a row, a row back as records, and a `LogQuery` as SQL conditions (observe/logstore.py
runs them)."""

from __future__ import annotations

import array
import json
import re
from typing import Any

from .records import LEVELS, LogBatch, LogQuery, LogRecord

__all__ = [
    "ADDED_COLUMNS", "COLUMNS", "INDEX", "INSERT", "NAMES", "POSITION", "RANKS", "SCHEMA",
    "TOKEN", "UNKNOWN_LEVEL", "batch_row", "has_words", "opened", "record_row",
    "unpack_times", "where",
]  # fmt: skip

UNKNOWN_LEVEL = len(LEVELS)  # an unknown level ranks above all: never filtered out

COLUMNS = (
    "time, app, source, stream, level, version, class_name, object_id, object_name, "
    "container_id, event, fields, message"
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, app TEXT NOT NULL, source TEXT NOT NULL,
    stream TEXT NOT NULL, level TEXT NOT NULL, version INTEGER, class_name TEXT NOT NULL,
    object_id TEXT NOT NULL, object_name TEXT NOT NULL, container_id TEXT NOT NULL,
    event TEXT NOT NULL, fields TEXT, message TEXT NOT NULL, level_rank INTEGER NOT NULL,
    first REAL, lines INTEGER NOT NULL DEFAULT 1, times BLOB);
CREATE INDEX IF NOT EXISTS logs_time ON logs (time);
CREATE INDEX IF NOT EXISTS logs_app_time ON logs (app, time);
CREATE INDEX IF NOT EXISTS logs_container_time ON logs (container_id, time);
CREATE INDEX IF NOT EXISTS logs_object_time ON logs (object_id, time);
CREATE VIRTUAL TABLE IF NOT EXISTS logs_fts USING fts5 (
    message, content='logs', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS logs_fts_delete AFTER DELETE ON logs BEGIN
    INSERT INTO logs_fts (logs_fts, rowid, message) VALUES ('delete', old.id, old.message); END;
CREATE TABLE IF NOT EXISTS log_files (
    container_id TEXT PRIMARY KEY, inode INTEGER NOT NULL, offset INTEGER NOT NULL,
    time REAL NOT NULL);
"""
# Columns a store written before batches lacks (added in place, the rows kept).
ADDED_COLUMNS = (("first", "REAL"), ("lines", "INTEGER NOT NULL DEFAULT 1"), ("times", "BLOB"))
INSERT = (
    f"INSERT INTO logs ({COLUMNS}, level_rank, first, lines, times) VALUES ({', '.join('?' * 17)})"
)
POSITION = (
    "INSERT INTO log_files (container_id, inode, offset, time) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (container_id) DO UPDATE SET inode = excluded.inode, "
    "offset = excluded.offset, time = excluded.time"
)
INDEX = "INSERT INTO logs_fts (rowid, message) SELECT id, message FROM logs WHERE id > ?"
NAMES = tuple(name.strip() for name in COLUMNS.split(","))
EQUAL = ("app", "source", "class_name", "object_id", "container_id")
RANKS = {level: rank for rank, level in enumerate(LEVELS)}
TOKEN = re.compile(r"[^\W_]+")  # what FTS5's unicode61 tokenizer calls a word


def record_row(r: LogRecord) -> tuple[Any, ...]:
    fields = json.dumps(dict(r.fields), separators=(",", ":"), default=str) if r.fields else None
    rank = RANKS.get(r.level, UNKNOWN_LEVEL)
    return (
        float(r.time), r.app, r.source, r.stream, r.level, r.version, r.class_name,
        r.object_id, r.object_name, r.container_id, r.event, fields, str(r.message), rank,
        None, 1, None,
    )  # fmt: skip


def batch_row(b: LogBatch) -> tuple[Any, ...]:
    times = array.array("d", b.times)
    if len(times) != len(b.texts) or any("\n" in text for text in b.texts):
        raise ValueError("a batch needs one time per line and lines without newlines")
    return (
        times[-1], b.app, "container", b.stream, "info", b.version, b.class_name,
        b.object_id, b.object_name, b.container_id, "", None, "\n".join(b.texts),
        RANKS["info"], times[0], len(times), times.tobytes(),
    )  # fmt: skip


def unpack_times(blob: bytes) -> array.array[float]:
    times = array.array("d")
    times.frombytes(blob)
    return times


def opened(
    row: tuple[Any, ...], q: LogQuery, words: list[str]
) -> list[tuple[float, int, int, LogRecord]]:
    """A row as (time, id, line, record) entries: itself, or a batch's lines that match."""
    row_id, *columns, times = row
    data = dict(zip(NAMES, columns, strict=True))
    data["fields"] = json.loads(data["fields"]) if data["fields"] else {}
    if times is None:
        return [(data["time"], row_id, 0, LogRecord(**data))]
    opened = []
    for index, (at, text) in enumerate(
        zip(unpack_times(times), data["message"].split("\n"), strict=True)
    ):
        if q.since is not None and at < q.since:
            continue
        if q.until is not None and at >= q.until:
            continue
        if words and not has_words(text, words):
            continue
        data["time"], data["message"] = at, text
        opened.append((at, row_id, index, LogRecord(**data)))
    return opened


def has_words(text: str, words: list[str]) -> bool:
    """What the FTS5 match means, for one line: every word starts one of its words."""
    own = TOKEN.findall(text.lower())
    return all(any(token.startswith(word) for token in own) for word in words)


def where(q: LogQuery) -> tuple[str, list[Any]]:
    tokens = TOKEN.findall(q.text or "")
    conditions = [
        *((f"{name} = ?", getattr(q, name)) for name in EQUAL),
        ("time >= ?", q.since),
        ("coalesce(first, time) < ?", q.until),
        ("level_rank >= ?", RANKS.get(q.level or "")),  # an unknown minimum: no filter
        ("id IN (SELECT rowid FROM logs_fts WHERE logs_fts MATCH ?)",
         " ".join(f'"{token}"*' for token in tokens) or None),
    ]  # fmt: skip
    used = [(sql, value) for sql, value in conditions if value is not None]
    where = " AND ".join(sql for sql, _ in used)
    return (f"WHERE {where}" if where else ""), [value for _, value in used]
