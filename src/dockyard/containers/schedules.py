"""``Container.schedule``: one-off method calls stored in the object's own SQLite.

The rows live in the internal table ``_dockyard_schedules``, which user SQL can neither
read nor change and ``storage.delete_all()`` leaves alone. Releases before it kept them
in a user table, ``container_schedules``; its rows move over (and the old table goes)
the first time the internal table is made, so a user table of that name created later
is the user's own.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from ..errors import InvalidArgument
from ..objects.internal import InternalStore, internal_store
from ..objects.sql import SqlStorage

__all__ = ["Schedule", "ScheduleTable"]

TABLE = "_dockyard_schedules"
OLD_TABLE = "container_schedules"
_COLUMNS = ("id", "callback", "payload", "type", "time", "delay")


@dataclass(frozen=True, slots=True)
class Schedule:
    id: str
    callback: str
    payload: Any
    # Unix time in seconds at which the call is due.
    time: float
    type: Literal["scheduled", "delayed"]
    delay_seconds: float | None = None


def due_time(when: datetime | float | int) -> tuple[float, Literal["scheduled", "delayed"]]:
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise InvalidArgument("schedule(when=datetime): give an aware datetime (with tzinfo)")
        return when.timestamp(), "scheduled"
    if isinstance(when, bool) or not isinstance(when, int | float) or when < 0:
        raise InvalidArgument(
            f"schedule(when=...): expected a datetime or a delay in seconds >= 0, got {when!r}"
        )
    return time.time() + float(when), "delayed"


class ScheduleTable:
    """The schedule rows of one object, through its internal SQL.

    Takes the object's storage (``ctx.storage``); its ``storage.sql`` is accepted too.
    """

    def __init__(self, storage: Any) -> None:
        store = storage if isinstance(storage, SqlStorage) else storage.internal
        self.sql: InternalStore = internal_store(store) if isinstance(store, SqlStorage) else store
        exists = self.sql.exec(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", TABLE
        ).to_array()
        if exists:
            return
        with self.sql.atomic():
            self.sql.exec(
                f"CREATE TABLE IF NOT EXISTS {TABLE} ("
                " id TEXT PRIMARY KEY, callback TEXT NOT NULL, payload TEXT,"
                " type TEXT NOT NULL, time REAL NOT NULL, delay REAL)"
            )
            self._migrate()

    def _migrate(self) -> None:
        """Move the rows of the user table older releases used, if it is theirs."""
        columns = tuple(
            row["name"]
            for row in self.sql.exec(f"SELECT name FROM pragma_table_info('{OLD_TABLE}')")
        )
        if columns != _COLUMNS:
            return
        names = ", ".join(_COLUMNS)
        self.sql.exec(f"INSERT OR IGNORE INTO {TABLE} ({names}) SELECT {names} FROM {OLD_TABLE}")
        self.sql.exec(f"DROP TABLE {OLD_TABLE}")

    def add(self, when: datetime | float | int, callback: str, payload: Any) -> Schedule:
        at, kind = due_time(when)
        row = Schedule(
            id=secrets.token_hex(6),
            callback=callback,
            payload=payload,
            time=at,
            type=kind,
            delay_seconds=float(when) if kind == "delayed" else None,  # type: ignore[arg-type]
        )
        self.sql.exec(
            f"INSERT INTO {TABLE} (id, callback, payload, type, time, delay) VALUES (?,?,?,?,?,?)",
            row.id,
            row.callback,
            json.dumps(payload),
            row.type,
            row.time,
            row.delay_seconds,
        )
        return row

    def get(self, schedule_id: str) -> Schedule | None:
        rows = list(self.sql.exec(f"SELECT * FROM {TABLE} WHERE id = ?", schedule_id))
        return _schedule(rows[0]) if rows else None

    def all(self) -> list[Schedule]:
        return [_schedule(row) for row in self.sql.exec(f"SELECT * FROM {TABLE} ORDER BY time")]

    def due(self, now: float) -> list[Schedule]:
        rows = self.sql.exec(f"SELECT * FROM {TABLE} WHERE time <= ? ORDER BY time", now)
        return [_schedule(row) for row in rows]

    def next_time(self) -> float | None:
        rows = list(self.sql.exec(f"SELECT MIN(time) AS t FROM {TABLE}"))
        return rows[0]["t"] if rows and rows[0]["t"] is not None else None

    def delete(self, schedule_id: str) -> bool:
        cursor = self.sql.exec(f"DELETE FROM {TABLE} WHERE id = ?", schedule_id)
        list(cursor)
        return bool(cursor.rows_written)


def _schedule(row: dict[str, Any]) -> Schedule:
    return Schedule(
        id=row["id"],
        callback=row["callback"],
        payload=json.loads(row["payload"]) if row["payload"] is not None else None,
        time=row["time"],
        type=row["type"],
        delay_seconds=row["delay"],
    )
