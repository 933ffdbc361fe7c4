"""What Dockyard observes, as plain records: log lines and platform events, and the
queries over them. Every part that produces or stores them (the engine watcher, the app
processes, the log store, the dashboard, the CLI) speaks these types and nothing else.

A record is one line a container or worker printed, or one thing the platform did
(``source == "platform"``, with ``event`` naming it). It travels as one JSON object.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "EVENTS",
    "LEVELS",
    "FilePosition",
    "LogBatch",
    "LogQuery",
    "LogRecord",
    "LogSink",
    "UsageRow",
    "emit_batch",
    "level_at_least",
]

Source = Literal["container", "worker", "platform"]
Stream = Literal["stdout", "stderr", "event"]

# Ordered: a query's `level` keeps that level and the ones after it.
LEVELS = ("debug", "info", "warning", "error")

# The platform events (LogRecord.event when source == "platform") and their fields.
EVENTS = {
    "deploy": "version, images",
    "rollout.step": "version, class_name, step, replaced, total",
    "rollout.done": "version, status",
    "container.start": "cold_start_ms",
    "container.start_failed": "reason",
    # reason: Cloudflare's (exit, runtime_signal); detail: Dockyard's finer one.
    "container.stop": "exit_code, reason, detail",
    "container.oom": "exit_code",
    "alarm.retry": "attempt, error, dropped",
}


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One log line or platform event. ``time`` is Unix seconds (sub-second precision)."""

    app: str
    message: str
    source: Source = "worker"
    stream: Stream = "stdout"
    level: str = "info"
    time: float = field(default_factory=time.time)
    version: int | None = None
    class_name: str = ""
    object_id: str = ""
    object_name: str = ""
    container_id: str = ""
    # Platform records only: one of EVENTS.
    event: str = ""
    # Structured extras (exit_code, reason, cold_start_ms, ...): JSON values only.
    fields: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fields"] = dict(self.fields)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogRecord:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


@dataclass(frozen=True, slots=True)
class LogQuery:
    """Which records: every field left None matches all. ``text`` is a full-text match
    on the message (words, all of them present); ``level`` a minimum level."""

    app: str | None = None
    since: float | None = None
    until: float | None = None
    source: str | None = None
    class_name: str | None = None
    object_id: str | None = None
    container_id: str | None = None
    level: str | None = None
    text: str | None = None
    limit: int = 1000

    def matches(self, record: LogRecord) -> bool:
        """The same filter in memory, for live tails (``text``: every word appears,
        case-insensitive)."""
        if self.app is not None and record.app != self.app:
            return False
        if self.since is not None and record.time < self.since:
            return False
        if self.until is not None and record.time >= self.until:
            return False
        for wanted, actual in (
            (self.source, record.source),
            (self.class_name, record.class_name),
            (self.object_id, record.object_id),
            (self.container_id, record.container_id),
        ):
            if wanted is not None and wanted != actual:
                return False
        if self.level is not None and not level_at_least(record.level, self.level):
            return False
        if self.text:
            message = record.message.lower()
            return all(word in message for word in self.text.lower().split())
        return True


@dataclass(frozen=True, slots=True)
class FilePosition:
    """How far a container's log file was read: the file's inode and the byte offset
    after the last line taken. The store keeps it in the transaction that keeps those
    lines, so a restart resumes exactly there."""

    container_id: str
    inode: int
    offset: int


@dataclass(frozen=True, slots=True)
class LogBatch:
    """Consecutive lines of one container's stream, read together from its log file.

    The engine watcher's unit at high rates: one object per read instead of one record
    per line, stored as one row (``LogStore``) and opened into records only where a
    reader wants lines. ``texts`` hold no newline.
    """

    app: str
    stream: Stream
    times: list[float]
    texts: list[str]
    version: int | None = None
    class_name: str = ""
    object_id: str = ""
    object_name: str = ""
    container_id: str = ""
    # Where the file was read up to after the last of these lines (None: not from a file).
    position: FilePosition | None = None

    def records(self) -> list[LogRecord]:
        return [
            LogRecord(
                app=self.app,
                message=text,
                source="container",
                stream=self.stream,
                time=at,
                version=self.version,
                class_name=self.class_name,
                object_id=self.object_id,
                object_name=self.object_name,
                container_id=self.container_id,
            )
            for at, text in zip(self.times, self.texts, strict=True)
        ]


def emit_batch(sink: LogSink, batch: LogBatch) -> None:
    """Hand `batch` to `sink` whole when it takes batches (``emit_batch``), else line by
    line."""
    take = getattr(sink, "emit_batch", None)
    if take is not None:
        take(batch)
        return
    for record in batch.records():
        sink.emit(record)


def level_at_least(level: str, minimum: str) -> bool:
    try:
        return LEVELS.index(level) >= LEVELS.index(minimum)
    except ValueError:
        return True  # an unknown level is never filtered out


class LogSink(Protocol):
    """Where records go. ``emit`` never blocks the event loop and never raises: a sink
    that cannot keep up drops and counts, it does not slow the request path."""

    def emit(self, record: LogRecord) -> None: ...


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Metered use, summed over the runs that share ``key`` (an app, class, object id or
    day "YYYY-MM-DD", per the query's ``by``). Seconds are metered in 10 ms steps."""

    key: str
    runs: int
    running_seconds: float
    paused_seconds: float
    vcpu_seconds: float  # active CPU, from the container's cgroup
    memory_gib_seconds: float  # provisioned memory while running
    disk_gb_seconds: float  # provisioned disk while running
    egress_bytes: int
    cost_usd: float
