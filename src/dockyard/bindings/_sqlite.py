"""The one way a local binding (KV, D1) opens its SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["open_database"]


def open_database(path: Path, *statements: str) -> sqlite3.Connection:
    """Open ``path`` (creating its folder) in autocommit, WAL mode, every commit synced
    before it returns (an acknowledged write survives a crash), then run ``statements``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for statement in statements:
        conn.execute(statement)
    return conn
