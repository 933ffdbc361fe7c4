"""The node's log store: every LogRecord, in one SQLite file, queryable and tailable.

Why it is shaped this way:

- ``emit`` runs on the event loop, on the request path, so it only appends to a bounded
  buffer and hands matching records to live tails. A single writer thread takes the buffer
  in batches of up to BATCH records, one transaction each (about 30,000 records/s for
  the writer alone on a 2-core EPYC, bench/scenarios/log_ingest.py); ``sqlite3`` releases
  the GIL while SQLite works, so the loop keeps running. The buffer absorbs bursts: 20,000
  records/s for 10 s are all stored even when the writer, sharing the CPU, is slower.
- WAL mode with ``synchronous=NORMAL``: a committed batch survives the process being
  killed, readers (``query``) never wait for the writer, and a commit costs no fsync.
- The message is indexed by an FTS5 table with external content (the text is stored once,
  in ``logs``). A batch's rows and their index entries go in one transaction, so a crash
  cannot leave them apart. Inserts are indexed with one INSERT ... SELECT per batch: an
  insert trigger does the same work row by row at a third of the speed (measured).
  Deletes, rarer, go through a trigger.
- Container lines read from the engine's log files come as `LogBatch` es (a run of one
  stream's lines) and are stored one row per batch: the lines joined by newlines, their
  times packed in ``times``, ``time`` the newest and ``first`` the oldest. At 20,000
  lines/s that is tens of rows a second instead of 20,000 (the per-row work of the table,
  its indexes and FTS5 is what a busy node paid for). Queries open such rows into lines
  and filter those; how far each file was read (`FilePosition`) is kept in ``log_files``
  in the same transaction as its lines.
- Retention deletes the oldest rows in chunks (short transactions, so the writer is
  never held up for long). Size is measured on the database pages in use, so pages freed
  by a prune count as free and the file stops growing at about ``max_bytes``.

Over 400 lines: one SQLite store: the writer, the readers for queries and tails,
retention and statistics share the connection and the schema.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DockyardError
from .logrows import (
    ADDED_COLUMNS,
    COLUMNS,
    INDEX,
    INSERT,
    POSITION,
    SCHEMA,
    TOKEN,
    batch_row,
    opened,
    record_row,
    unpack_times,
    where,
)
from .records import FilePosition, LogBatch, LogQuery, LogRecord

__all__ = ["DROPPED_MESSAGE", "LogStore", "LogStoreStatistics"]

log = logging.getLogger(__name__)

# The message of the record a slow tail gets in place of the lines it missed.
DROPPED_MESSAGE = "{} lines dropped"
# Lines waiting for the writer (350-700 B each as records, measured); past this, emit
# drops and counts.
MAX_PENDING = 200_000
BATCH = 5_000  # lines per transaction; the writer is woken early when this many wait
CHUNK = 10_000  # rows per delete transaction when pruning


@dataclass(frozen=True, slots=True)
class LogStoreStatistics:
    rows: int  # a batch of lines is one row
    bytes: int  # database pages in use (what retention by size measures)
    dropped: int  # records the store could not keep (buffer full, closed, write failed)
    oldest: float | None  # time of the oldest stored record
    pending: int  # emitted, not yet committed
    tails: int  # live tails following the store


class _Reader:
    """One live tail's bounded buffer. ``skipped`` counts records that did not fit since
    the last one that did: the reader sees one marker record in their place."""

    __slots__ = ("buffer", "limit", "query", "skipped", "wake")

    def __init__(self, query: LogQuery, limit: int) -> None:
        self.query, self.limit = query, limit
        self.buffer: deque[LogRecord] = deque()
        self.skipped = 0
        self.wake = asyncio.Event()

    def offer(self, record: LogRecord) -> None:
        if not self.query.matches(record):
            return
        if len(self.buffer) >= self.limit:
            self.skipped += 1
            return
        if self.skipped:
            self.buffer.append(self.marker())
        self.buffer.append(record)
        self.wake.set()

    def marker(self) -> LogRecord:
        count, self.skipped = self.skipped, 0
        message = DROPPED_MESSAGE.format(count)
        return LogRecord(self.query.app or "", message, "platform", "event", "warning",
                         fields={"dropped": count})  # fmt: skip


class LogStore:
    """Implements LogSink. Use as ``async with LogStore(path) as store:``."""

    def __init__(
        self,
        path: Path,
        *,
        retention_seconds: float = 7 * 86400,
        max_bytes: int = 1 << 30,
        flush_interval: float = 0.1,
        prune_interval: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.retention_seconds = retention_seconds
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        self.prune_interval = prune_interval
        self._pending: deque[LogRecord | LogBatch] = deque()
        self._accepted = 0  # records and batches put in _pending (loop thread)
        self._handled = 0  # of those, committed or dropped by the writer (writer thread)
        self._accepted_lines = 0  # lines in what was put in _pending (loop thread)
        self._handled_lines = 0  # lines in what the writer took (writer thread)
        self._dropped = 0  # by emit, on the loop thread
        self._write_dropped = 0  # by the writer thread (one writer per counter: no lost adds)
        self._rows = 0
        self._count_lock = threading.Lock()
        self._readers: tuple[_Reader, ...] = ()
        self._flushers: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._reader_db: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()

    async def __aenter__(self) -> LogStore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open (or create) the database and start the writer thread."""
        self._loop = asyncio.get_running_loop()
        writer = await asyncio.to_thread(self._open)
        self._thread = threading.Thread(
            target=self._run, args=(writer,), name=f"logstore {self.path.name}", daemon=True
        )
        self._thread.start()

    async def aclose(self) -> None:
        """Commit everything emitted so far, end the writer and every tail."""
        if self._closed:
            return
        self._closed = True
        for reader in self._readers:
            reader.wake.set()
        self._readers = ()
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            await asyncio.to_thread(self._thread.join)
        with self._reader_lock:
            if self._reader_db is not None:
                self._reader_db.close()
                self._reader_db = None

    # -- the loop side ---------------------------------------------------------------

    def emit(self, record: LogRecord) -> None:
        """Buffer ``record`` for the writer and offer it to live tails. Never blocks: when
        the writer is far behind (or the store closed) the record is dropped and counted."""
        if not self._queue(record, 1):
            return
        for reader in self._readers:  # a tuple: a tail closing meanwhile cannot disturb it
            try:
                reader.offer(record)
            except Exception:  # a record a query cannot read (bad types): not this tail's
                reader.skipped += 1

    def emit_batch(self, batch: LogBatch) -> None:
        """`emit` for a run of lines (the engine watcher's file reads), stored as one row;
        live tails get its lines one by one."""
        if not self._queue(batch, len(batch.texts)):
            return
        if self._readers:
            for record in batch.records():
                for reader in self._readers:
                    reader.offer(record)

    def _queue(self, item: LogRecord | LogBatch, lines: int) -> bool:
        if self._closed or self._accepted_lines - self._handled_lines >= MAX_PENDING:
            self._dropped += lines
            return False
        self._pending.append(item)
        self._accepted += 1
        self._accepted_lines += lines
        if self._accepted_lines - self._handled_lines >= BATCH and not self._wake.is_set():
            self._wake.set()
        return True

    async def flush(self) -> None:
        """Return once everything emitted before the call is committed (or dropped)."""
        target = self._accepted
        if self._handled >= target or self._thread is None:
            return
        future = asyncio.get_running_loop().create_future()
        self._flushers.append((target, future))
        # The writer may have got there between the check above and the append.
        self._wake_flushers(self._handled)
        self._wake.set()
        await future

    def tail(self, query: LogQuery, *, buffer: int = 1000) -> AsyncGenerator[LogRecord, None]:
        """Records emitted from now on that match ``query``, as they come. A reader slower
        than the records keeps at most ``buffer`` of them; the others are replaced by one
        DROPPED_MESSAGE record. Text matches substrings here (LogQuery.matches)."""
        reader = _Reader(query, buffer)
        self._readers = (*self._readers, reader)
        follow = self._follow(reader)
        # A tail dropped without being iterated to the end still unregisters.
        weakref.finalize(follow, self._forget, reader)
        return follow

    async def _follow(self, reader: _Reader) -> AsyncGenerator[LogRecord, None]:
        try:
            while True:
                if reader.buffer:
                    yield reader.buffer.popleft()
                elif reader.skipped:
                    yield reader.marker()
                elif self._closed:
                    return
                else:
                    reader.wake.clear()
                    await reader.wake.wait()
        finally:
            self._forget(reader)

    def _forget(self, reader: _Reader) -> None:
        self._readers = tuple(r for r in self._readers if r is not reader)

    # -- reading ----------------------------------------------------------------------

    def query(self, q: LogQuery) -> list[LogRecord]:
        """The newest ``q.limit`` committed records matching ``q``, oldest first. ``q.text``
        matches words by their start (FTS5 prefix search): "conn" finds "connection"."""
        limit = max(0, q.limit)
        if limit == 0:
            return []
        conditions, params = where(q)
        # Newest first by each row's newest line; a batch row opens into its lines. Once
        # `limit` lines are found, a row whose newest line is older than all of them
        # cannot change the answer, nor can any row after it.
        sql = f"SELECT id, {COLUMNS}, times FROM logs {conditions} ORDER BY time DESC, id DESC"
        words = [token.lower() for token in TOKEN.findall(q.text or "")]
        found: list[tuple[float, int, int, LogRecord]] = []
        oldest_kept = -math.inf
        with self._reader_lock:
            cursor = self._connection().execute(sql, params)
            try:
                while rows := cursor.fetchmany(256):
                    if len(found) >= limit and rows[0][1] < oldest_kept:
                        break
                    for row in rows:
                        found.extend(opened(row, q, words))
                    if len(found) >= limit:
                        found.sort(reverse=True)
                        del found[limit:]
                        oldest_kept = found[-1][0]
            finally:
                cursor.close()
        found.sort()
        return [record for *_, record in found[-limit:]]

    def file_positions(self) -> dict[str, FilePosition]:
        """Per container, how far its log file's lines are stored (the watcher resumes
        there)."""
        with self._reader_lock:
            rows = (
                self._connection()
                .execute("SELECT container_id, inode, offset FROM log_files")
                .fetchall()
            )
        return {cid: FilePosition(cid, int(inode), int(offset)) for cid, inode, offset in rows}

    def newest_lines(self, since: float) -> dict[str, tuple[float, int]]:
        """Per container with lines stored at or after ``since``: the time of its newest
        committed line and how many lines it has at exactly that time. What the engine
        watcher resumes from after a crash: the store, not its cursor, knows what was
        kept (a line delivered but not committed is read again, none is stored twice)."""
        with self._reader_lock:
            db = self._connection()
            newest = db.execute(
                "SELECT container_id, max(time) FROM logs WHERE source = 'container' "
                "AND container_id != '' AND time >= ? GROUP BY container_id",
                (since,),
            ).fetchall()
            kept: dict[str, tuple[float, int]] = {}
            for cid, at in newest:
                rows = db.execute(
                    "SELECT times FROM logs WHERE container_id = ? AND time = ? "
                    "AND source = 'container'",
                    (cid, at),
                ).fetchall()
                count = sum(
                    1 if times is None else unpack_times(times).count(at) for (times,) in rows
                )
                kept[cid] = (at, count)
            return kept

    def statistics(self) -> LogStoreStatistics:
        with self._reader_lock:
            db = self._connection()
            (oldest,) = db.execute("SELECT min(time) FROM logs").fetchone()
            size = _size(db)
        pending, tails = len(self._pending), len(self._readers)
        return LogStoreStatistics(
            self._rows, size, self._dropped + self._write_dropped, oldest, pending, tails
        )

    def prune(self) -> int:
        """Apply retention now (the writer also does it every ``prune_interval``): rows
        older than ``retention_seconds``, then the oldest rows until the database fits
        ``max_bytes``. Returns the number of rows removed. Blocks its caller while it
        deletes: from a coroutine, call it through ``asyncio.to_thread``."""
        with self._reader_lock:
            return self._prune(self._connection())

    # -- the writer thread --------------------------------------------------------------

    def _run(self, db: sqlite3.Connection) -> None:
        try:
            self._prune(db)  # what expired while the node was down, before any new write
            next_prune = time.monotonic() + self.prune_interval
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                stopping = self._stopping
                while self._pending:
                    batch = self._take()
                    try:
                        self._write(db, batch)
                        if self._over_size(db):  # before flush() returns: it sees the limit kept
                            self._prune(db)
                    finally:  # written or dropped: either way flush() must not wait for it
                        self._handled += len(batch)
                        self._release_flushers()
                if time.monotonic() >= next_prune:
                    self._prune(db)
                    next_prune = time.monotonic() + self.prune_interval
                if stopping:
                    return
        finally:
            db.close()

    def _take(self) -> list[LogRecord | LogBatch]:
        """Records and batches from the front of the queue, up to about BATCH lines."""
        taken: list[LogRecord | LogBatch] = []
        lines = 0
        while self._pending and lines < BATCH:
            item = self._pending.popleft()
            taken.append(item)
            lines += 1 if isinstance(item, LogRecord) else len(item.texts)
        self._handled_lines += lines
        return taken

    def _write(self, db: sqlite3.Connection, batch: list[LogRecord | LogBatch]) -> None:
        rows = []
        positions = []
        lines = 0
        for item in batch:
            try:
                if isinstance(item, LogRecord):
                    rows.append(record_row(item))
                    lines += 1
                    continue
                if item.texts:
                    rows.append(batch_row(item))
                    lines += len(item.texts)
                if item.position is not None:
                    at = item.times[-1] if item.times else time.time()
                    p = item.position
                    positions.append((p.container_id, p.inode, p.offset, at))
            except (TypeError, ValueError):
                self._write_dropped += 1 if isinstance(item, LogRecord) else len(item.texts)
        try:
            with _transaction(db):
                (last,) = db.execute("SELECT coalesce(max(id), 0) FROM logs").fetchone()
                db.executemany(INSERT, rows)
                db.execute(INDEX, (last,))
                db.executemany(POSITION, positions)
        except sqlite3.Error as exc:
            # A full disk or a broken file must not stop logging for good: drop, count, go on.
            log.warning("log store %s: %d lines not written: %s", self.path, lines, exc)
            self._write_dropped += lines
            return
        with self._count_lock:
            self._rows += len(rows)

    def _over_size(self, db: sqlite3.Connection) -> bool:
        try:
            return _size(db) > self.max_bytes
        except sqlite3.Error:
            return False

    def _release_flushers(self) -> None:
        if self._loop is not None and self._flushers:
            with suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                self._loop.call_soon_threadsafe(self._wake_flushers, self._handled)

    def _wake_flushers(self, handled: int) -> None:
        waiting = []
        for target, future in self._flushers:
            if target <= handled:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((target, future))
        self._flushers = waiting

    def _prune(self, db: sqlite3.Connection) -> int:
        try:
            cutoff = time.time() - self.retention_seconds
            removed = self._delete_oldest(db, "WHERE time < ?", cutoff, most=math.inf)
            with _transaction(db):  # files of containers long gone
                db.execute("DELETE FROM log_files WHERE time < ?", (cutoff,))
            for _ in range(8):  # each round removes about the excess; stop if it cannot
                used = _size(db)
                if used <= self.max_bytes or self._rows == 0:
                    break
                # Down to 90%: pruning by size then happens once per 10% of growth.
                excess = (used - 0.9 * self.max_bytes) / used
                removed += self._delete_oldest(db, "", most=max(1, math.ceil(self._rows * excess)))
                # Deleted entries leave the FTS index only when its segments are merged.
                db.execute("INSERT INTO logs_fts (logs_fts, rank) VALUES ('merge', 500)")
            return removed
        except sqlite3.Error as exc:
            log.warning("log store %s: prune failed: %s", self.path, exc)
            return 0

    def _delete_oldest(
        self, db: sqlite3.Connection, condition: str, *params: Any, most: float
    ) -> int:
        oldest = f"SELECT id FROM logs {condition} ORDER BY time, id LIMIT ?"
        sql = f"DELETE FROM logs WHERE id IN ({oldest})"
        removed, chunk = 0, CHUNK
        while removed < most and chunk == CHUNK:
            with _transaction(db):
                chunk = db.execute(sql, (*params, int(min(CHUNK, most - removed)))).rowcount
            with self._count_lock:
                self._rows -= chunk
            removed += chunk
        return removed

    # -- connections --------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            writer = _connect(self.path)
            writer.executescript(SCHEMA)
            present = {row[1] for row in writer.execute("PRAGMA table_info(logs)")}
            for name, kind in ADDED_COLUMNS:
                if name not in present:
                    writer.execute(f"ALTER TABLE logs ADD COLUMN {name} {kind}")
            (self._rows,) = writer.execute("SELECT count(*) FROM logs").fetchone()
            self._reader_db = _connect(self.path)
        except (sqlite3.Error, OSError) as exc:
            raise DockyardError(f"cannot open the log store {self.path}: {exc}") from None
        return writer

    def _connection(self) -> sqlite3.Connection:
        """The connection for queries and prune(): readers never wait for the writer (WAL).
        Callers hold _reader_lock: the loop and to_thread callers may share it."""
        if self._reader_db is None:
            raise DockyardError(f"the log store {self.path} is not open")
        return self._reader_db


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: _transaction() says where transactions begin and end.
    db = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL").fetchone()
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA journal_size_limit=67108864")  # a checkpointed WAL shrinks to 64 MiB
    return db


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """IMMEDIATE: the write lock is taken up front, so a concurrent prune() makes this wait
    (busy timeout) instead of failing the batch on a stale read snapshot."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _size(db: sqlite3.Connection) -> int:
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    (free,) = db.execute("PRAGMA freelist_count").fetchone()
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    return int((pages - free) * page_size)
