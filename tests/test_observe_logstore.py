"""LogStore on real SQLite files: queries, retention, restarts, live tails, crashes, load."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from dockyard.errors import DockyardError
from dockyard.observe.logstore import DROPPED_MESSAGE, LogStore
from dockyard.observe.records import LogQuery, LogRecord
from tests.support.objects_helpers import wait_for

T0 = 1_800_000_000.0  # a fixed "now" for records whose time matters


def rec(message: str, **kw: object) -> LogRecord:
    kw.setdefault("app", "shop")
    return LogRecord(message=message, **kw)  # type: ignore[arg-type]


def messages(records: list[LogRecord]) -> list[str]:
    return [r.message for r in records]


async def filled(path: Path, records: list[LogRecord], **kw: object) -> LogStore:
    store = LogStore(path, retention_seconds=1e12, **kw)  # type: ignore[arg-type]
    await store.start()
    for r in records:
        store.emit(r)
    await store.flush()
    return store


async def test_query_by_time_range_field_text_and_level(tmp_path: Path) -> None:
    records = [
        rec("GET /cart served in 3 ms", time=T0 + 1, class_name="Web", object_id="o1"),
        rec("connection refused by upstream", time=T0 + 2, level="error", container_id="c1"),
        rec("cache warm", time=T0 + 3, level="debug", source="container", container_id="c1"),
        rec("Connecting to database", time=T0 + 4, level="warning", object_id="o2"),
        rec(
            "deploy v2",
            time=T0 + 5,
            app="blog",
            source="platform",
            event="deploy",
            fields={"version": 2, "images": ["a"]},
            version=2,
        ),
        rec("odd level line", time=T0 + 6, level="notice"),
    ]
    store = await filled(tmp_path / "logs.db", records)
    try:
        q = store.query
        assert messages(q(LogQuery(since=T0 + 2, until=T0 + 4))) == [
            "connection refused by upstream",
            "cache warm",
        ]
        assert messages(q(LogQuery(app="blog"))) == ["deploy v2"]
        assert messages(q(LogQuery(container_id="c1", source="container"))) == ["cache warm"]
        assert messages(q(LogQuery(object_id="o2"))) == ["Connecting to database"]
        assert messages(q(LogQuery(class_name="Web"))) == ["GET /cart served in 3 ms"]
        # Minimum level; an unknown level is never filtered out (as in LogQuery.matches).
        assert messages(q(LogQuery(app="shop", level="warning"))) == [
            "connection refused by upstream",
            "Connecting to database",
            "odd level line",
        ]
        # Words, all present, case-insensitive, matched by their start.
        assert messages(q(LogQuery(text="CONN"))) == [
            "connection refused by upstream",
            "Connecting to database",
        ]
        assert messages(q(LogQuery(text="conn upstream"))) == ["connection refused by upstream"]
        assert messages(q(LogQuery(text="/cart"))) == ["GET /cart served in 3 ms"]
        assert q(LogQuery(text="nowhere")) == []
        # Every field comes back as it went in.
        (deploy,) = q(LogQuery(app="blog"))
        assert deploy == records[4]
    finally:
        await store.aclose()


async def test_query_returns_the_newest_matches_oldest_first(tmp_path: Path) -> None:
    # Emitted out of time order: the order is by time, not arrival.
    times = [T0 + i for i in range(10)]
    store = await filled(
        tmp_path / "logs.db", [rec(f"line {int(t - T0)}", time=t) for t in reversed(times)]
    )
    try:
        assert messages(store.query(LogQuery(limit=3))) == ["line 7", "line 8", "line 9"]
        assert len(store.query(LogQuery())) == 10
    finally:
        await store.aclose()


async def test_retention_by_age_on_prune(tmp_path: Path) -> None:
    now = time.time()
    async with LogStore(tmp_path / "logs.db", retention_seconds=3600) as store:
        for i in range(30):
            store.emit(rec(f"old {i}", time=now - 7200 - i))
        for i in range(5):
            store.emit(rec(f"new {i}", time=now - 60 + i))
        await store.flush()
        assert store.prune() == 30
        assert messages(store.query(LogQuery())) == [f"new {i}" for i in range(5)]
        assert store.statistics().rows == 5
        assert store.statistics().oldest == pytest.approx(now - 60)
        assert store.prune() == 0


async def test_retention_by_age_runs_on_its_own(tmp_path: Path) -> None:
    now = time.time()
    async with LogStore(tmp_path / "logs.db", retention_seconds=3600, prune_interval=0.05) as store:
        for i in range(100):
            store.emit(rec(f"old {i}", time=now - 7200))
        store.emit(rec("new", time=now))
        await store.flush()
        await wait_for(lambda: store.statistics().rows == 1, within=10, what="old rows pruned")
        assert messages(store.query(LogQuery())) == ["new"]


async def test_retention_by_size_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "logs.db"
    limit = 1 << 20
    padding = " ".join(f"word{i}" for i in range(20))
    async with LogStore(path, max_bytes=limit) as store:
        for chunk in range(40):  # about 10 MB of records, 1 MiB allowed
            for i in range(500):
                store.emit(rec(f"line {chunk * 500 + i} {padding}", time=T0 + chunk * 500 + i))
            await store.flush()
        stats = store.statistics()
        assert stats.bytes <= limit
        assert 0 < stats.rows < 20_000
        kept = store.query(LogQuery(limit=100_000))
        assert len(kept) == stats.rows
        # The newest survive, contiguous: only the oldest went.
        first = 20_000 - len(kept)
        assert [int(r.message.split()[1]) for r in kept] == list(range(first, 20_000))
        assert len(store.query(LogQuery(text="word7", limit=100_000))) == stats.rows
    # Freed pages are reused: the file stops growing near the limit.
    assert path.stat().st_size <= 2 * limit


async def test_restart_keeps_records_and_aclose_commits_everything(tmp_path: Path) -> None:
    path = tmp_path / "logs.db"
    async with LogStore(path) as store:
        for i in range(10_000):
            store.emit(rec(f"line {i}", time=T0 + i))
        # No flush: aclose must commit what is still buffered.
    async with LogStore(path) as store:
        assert store.statistics().rows == 10_000
        store.emit(rec("after restart", time=T0 + 20_000))
        await store.flush()
        got = store.query(LogQuery(limit=20_000))
        assert messages(got) == [f"line {i}" for i in range(10_000)] + ["after restart"]
        assert messages(store.query(LogQuery(text="restart"))) == ["after restart"]


async def test_tail_sees_only_live_matching_records(tmp_path: Path) -> None:
    async with LogStore(tmp_path / "logs.db") as store:
        store.emit(rec("before the tail error"))
        tail = store.tail(LogQuery(app="shop", level="error", text="disk"))
        store.emit(rec("disk full", level="error", app="blog"))  # other app
        store.emit(rec("disk full", level="info"))  # below the level
        store.emit(rec("network down", level="error"))  # other words
        store.emit(rec("Disk full on /data", level="error"))
        store.emit(rec("disk back", level="error"))
        async with asyncio.timeout(5):
            assert (await anext(tail)).message == "Disk full on /data"
            assert (await anext(tail)).message == "disk back"
            # And a record emitted while the reader waits wakes it.
            waiting = asyncio.ensure_future(anext(tail))
            await asyncio.sleep(0)  # one loop step: the reader runs until it waits (no timing)
            assert not waiting.done()
            store.emit(rec("disk again", level="error"))
            assert (await waiting).message == "disk again"
        assert store.statistics().tails == 1
        await tail.aclose()
        assert store.statistics().tails == 0


async def test_tail_ends_when_the_store_closes(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs.db")
    await store.start()
    tail = store.tail(LogQuery())
    store.emit(rec("last words"))

    async def read_all() -> list[str]:
        return [r.message async for r in tail]

    reading = asyncio.ensure_future(read_all())
    await store.aclose()
    async with asyncio.timeout(5):
        assert await reading == ["last words"]


async def test_a_tail_dropped_unread_is_forgotten(tmp_path: Path) -> None:
    async with LogStore(tmp_path / "logs.db") as store:
        tail = store.tail(LogQuery())
        assert store.statistics().tails == 1
        del tail
        assert store.statistics().tails == 0

        async def read_one() -> None:
            async for _ in store.tail(LogQuery()):
                break  # the loop finalizes the abandoned generator

        reading = asyncio.ensure_future(read_one())
        await wait_for(lambda: store.statistics().tails == 1, what="the tail registered")
        store.emit(rec("one"))
        await reading
        await wait_for(lambda: store.statistics().tails == 0, what="the tail forgotten")


async def test_emit_after_close_neither_raises_nor_stores(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs.db")
    async with store:
        store.emit(rec("kept"))
    store.emit(rec("too late"))  # never raises
    async with LogStore(tmp_path / "logs.db") as again:
        assert messages(again.query(LogQuery())) == ["kept"]


async def test_slow_tail_keeps_a_bounded_buffer_and_gets_one_dropped_marker(
    tmp_path: Path,
) -> None:
    async with LogStore(tmp_path / "logs.db") as store:
        tail = store.tail(LogQuery(app="shop"), buffer=100)
        for i in range(5_000):
            store.emit(rec(f"line {i}"))
        store.emit(rec("not followed", app="blog"))
        async with asyncio.timeout(5):
            got = [await anext(tail) for _ in range(101)]
            assert messages(got[:100]) == [f"line {i}" for i in range(100)]
            marker = got[100]
            assert marker.message == DROPPED_MESSAGE.format(4_900) == "4900 lines dropped"
            assert (marker.source, marker.level, marker.fields) == (
                "platform",
                "warning",
                {"dropped": 4_900},
            )
            # Caught up: the next record comes through as it is.
            store.emit(rec("fresh"))
            assert (await anext(tail)).message == "fresh"
        # The store itself kept every record.
        await store.flush()
        assert store.statistics().rows == 5_002


async def test_slow_tail_does_not_grow_memory(tmp_path: Path) -> None:
    async with LogStore(tmp_path / "logs.db") as store:
        tail = store.tail(LogQuery())  # never read
        tracemalloc.start()
        try:
            for chunk in range(10):
                for i in range(2_000):
                    store.emit(rec(f"line {chunk} {i} " + "x" * 100))
                await store.flush()
                if chunk == 1:
                    baseline = tracemalloc.get_traced_memory()[0]
            grown = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        # 16,000 more records held would be over 3 MB.
        assert grown < 1_000_000, f"grew by {grown} bytes"
        async with asyncio.timeout(5):
            assert (await anext(tail)).message.startswith("line 0 0 ")
        await tail.aclose()


CHILD = """
import asyncio, sys
from pathlib import Path
from dockyard.observe.logstore import LogStore
from dockyard.observe.records import LogRecord

async def main():
    async with LogStore(Path(sys.argv[1]), flush_interval=0.01) as store:
        n = 0
        while True:
            for _ in range(250):
                store.emit(LogRecord(app="kill", message=f"line {n}", time=1.8e9 + n))
                n += 1
            if n % 1000 == 0:
                await store.flush()
                print(n, flush=True)  # everything up to n is committed
            await asyncio.sleep(0)

asyncio.run(main())
"""


async def test_sigkill_loses_at_most_what_was_not_flushed(tmp_path: Path) -> None:
    path = tmp_path / "logs.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(path),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    flushed = 0
    try:
        assert child.stdout is not None
        while flushed < 20_000:
            line = await asyncio.wait_for(child.stdout.readline(), 30)
            assert line, "the child ended early"
            flushed = int(line)
        # Killed while it goes on emitting and committing.
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    async with LogStore(path) as store:
        stored = store.query(LogQuery(app="kill", limit=10**7))
        # Everything flushed is there, and what is there is a gapless prefix in order.
        assert len(stored) >= flushed
        assert messages(stored) == [f"line {i}" for i in range(len(stored))]
        assert len(store.query(LogQuery(text="line", limit=10**7))) == len(stored)
        assert store.statistics().rows == len(stored)
        store.emit(rec("after the crash"))
        await store.flush()
        assert messages(store.query(LogQuery(text="crash"))) == ["after the crash"]


@pytest.mark.parametrize("kind", ["directory", "not a database"])
async def test_a_store_that_cannot_be_opened_names_its_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "logs.db"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"this is no SQLite file at all, " * 100)
    with pytest.raises(DockyardError, match=f"cannot open the log store {path}"):
        await LogStore(path).start()


@pytest.mark.slow
async def test_20k_records_per_second_are_all_stored(tmp_path: Path) -> None:
    rate, seconds, tick = 20_000, 2.0, 0.01
    async with LogStore(tmp_path / "logs.db") as store:
        started = time.perf_counter()
        emitted, ticks = 0, 0
        while (now := time.perf_counter()) - started < seconds:
            due = int((now - started) * rate) - emitted
            for i in range(emitted, emitted + due):
                store.emit(rec(f"request {i} served in {i % 97} ms", object_id=f"o{i % 50}"))
            emitted += due
            ticks += 1
            await asyncio.sleep(max(0.0, started + ticks * tick - time.perf_counter()))
        await store.flush()
        stats = store.statistics()
        assert emitted >= rate * seconds * 0.95
        assert (stats.rows, stats.dropped, stats.pending) == (emitted, 0, 0)
        assert len(store.query(LogQuery(object_id="o7", limit=10**6))) == emitted // 50 + (
            emitted % 50 > 7
        )
