"""Container lines read from the engine's json-file log (observe/logfile.py), and stored
as batches with the position they were read up to (LogStore.emit_batch).

The first tests write json-file logs by hand, the way the engine does, to reach the
cases a run cannot reach on demand (a rotation at a given line, a cut line, a crash
between two reads); the last ones follow real containers on the real engine.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import NamedTuple

import pytest

from dockyard.containers.docker import DockerRuntime
from dockyard.observe.logfile import JsonLogFile, LineRun
from dockyard.observe.logstore import LogStore
from dockyard.observe.records import FilePosition, LogBatch, LogQuery, LogRecord
from dockyard.observe.watch import EngineWatcher
from tests.support.engine import wait_until
from tests.support.engine_proxy import EngineSocketProxy, open_engine_proxy
from tests.test_observe_watch import GATED_COUNTER, CollectingSink, run_sh, until, wait_for_count

T0 = 1_800_000_000


def entry(text: str, *, stream: str = "stdout", at: str = "2027-01-15T08:00:00.5Z") -> bytes:
    return json.dumps({"log": text, "stream": stream, "time": at}).encode() + b"\n"


def write(path: Path, *entries: bytes) -> None:
    with open(path, "ab") as file:
        file.write(b"".join(entries))


class Line(NamedTuple):
    time: float
    stream: str
    text: str
    end: int  # where to resume after it (-1: only a run's last line has one)


def lines_of(runs: list[LineRun]) -> list[Line]:
    return [
        Line(at, run.stream, text, run.end if index == len(run.texts) - 1 else -1)
        for run in runs
        for index, (at, text) in enumerate(zip(run.times, run.texts, strict=True))
    ]


def read_all(file: JsonLogFile) -> list[tuple[str, str]]:
    """Everything the reader has now (it reads in steps), as (stream, text)."""
    lines: list[tuple[str, str]] = []
    while runs := file.read():
        lines.extend((line.stream, line.text) for line in lines_of(runs))
    return lines


def test_lines_come_with_their_stream_and_the_engines_time(tmp_path: Path) -> None:
    log = tmp_path / "c-json.log"
    write(
        log,
        entry("first\n", at="2027-01-15T08:00:00.123456789Z"),
        entry("oops\n", stream="stderr", at="2027-01-15T08:00:01Z"),
        entry("caf\u00e9 \u2603\n", at="2027-01-15T08:00:01.5Z"),
    )
    file = JsonLogFile(str(log))
    lines = lines_of(file.read())
    base = 1_800_000_000  # 2027-01-15T08:00:00Z
    assert [(line.stream, line.text) for line in lines] == [
        ("stdout", "first"),
        ("stderr", "oops"),
        ("stdout", "caf\u00e9 \u2603"),
    ]
    assert [line.time for line in lines] == pytest.approx(
        [base + 0.123456789, base + 1, base + 1.5], abs=1e-6
    )
    assert lines[-1].end == log.stat().st_size


def test_a_plain_read_keeps_each_streams_runs_in_order(tmp_path: Path) -> None:
    """The common read (whole lines, the engine's time format) is taken in a few passes;
    it gives the same lines, times and run boundaries as the line-by-line one."""
    log = tmp_path / "c-json.log"
    streams = ["stdout"] * 3 + ["stderr"] * 2 + ["stdout"]
    write(
        log,
        *(
            entry(f"line {i}\n", stream=stream, at=f"2027-01-15T08:00:0{i}.25Z")
            for i, stream in enumerate(streams)
        ),
    )
    runs = JsonLogFile(str(log)).read()
    assert [(run.stream, run.texts) for run in runs] == [
        ("stdout", ["line 0", "line 1", "line 2"]),
        ("stderr", ["line 3", "line 4"]),
        ("stdout", ["line 5"]),
    ]
    assert [t - 1_800_000_000 for run in runs for t in run.times] == [i + 0.25 for i in range(6)]
    sizes = [len(entry(f"line {i}\n", stream=s, at="2027-01-15T08:00:00.25Z")) for i, s in
             enumerate(streams)]  # fmt: skip
    assert [run.end for run in runs] == [sum(sizes[:3]), sum(sizes[:5]), sum(sizes)]


def test_a_line_the_engine_cut_is_joined_and_one_over_the_limit_comes_in_pieces(
    tmp_path: Path,
) -> None:
    log = tmp_path / "c-json.log"
    write(log, entry("a" * 10), entry("b" * 10, stream="stderr"), entry("a" * 5 + "\n"))
    write(log, entry("x" * 25 + "\n", stream="stderr"))
    file = JsonLogFile(str(log), max_line_bytes=20)
    assert read_all(file) == [
        ("stdout", "a" * 15),
        ("stderr", "b" * 10 + "x" * 10),
        ("stderr", "x" * 15),
    ]


def test_a_resume_never_skips_the_start_of_a_line_still_cut(tmp_path: Path) -> None:
    log = tmp_path / "c-json.log"
    write(log, entry("whole\n"), entry("begun "), entry("other\n", stream="stderr"))
    file = JsonLogFile(str(log))
    lines = lines_of(file.read())
    assert [line.text for line in lines] == ["whole", "other"]
    # The position after "other" stays before "begun ": a reader resuming there (after a
    # crash) reads the cut line whole, and "other" again (it was stored with its position
    # only if the batch before it was).
    resume = FilePosition("c", file.inode, lines[-1].end)
    assert resume.offset == len(entry("whole\n"))
    write(log, entry("ended\n"))
    again = JsonLogFile(str(log), resume)
    assert read_all(again) == [("stderr", "other"), ("stdout", "begun ended")]


def test_reading_goes_on_across_the_engines_rotations_without_loss_or_repeat(
    tmp_path: Path,
) -> None:
    log = tmp_path / "c-json.log"
    write(log, *(entry(f"{i}\n") for i in range(3)))
    file = JsonLogFile(str(log))
    seen = read_all(file)
    write(log, entry("3\n"))
    # The engine rotates twice before the reader looks again: log -> .1 -> .2.
    os.rename(log, f"{log}.1")
    write(log, entry("4\n"))
    os.rename(f"{log}.1", f"{log}.2")
    os.rename(log, f"{log}.1")
    write(log, entry("5\n"), entry("6\n"))
    for _ in range(4):  # each end of a file moves the reader on to the next one
        seen += read_all(file)
    assert [text for _, text in seen] == [str(i) for i in range(7)]


def test_a_reader_left_behind_by_the_rotations_goes_on_with_the_oldest_kept_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """max-file 2: the engine rotated twice while the reader was busy, so the file it had
    open is gone (lines lost, and it says so); it carries on with what the engine kept."""
    log = tmp_path / "c-json.log"
    write(log, entry("0\n"))
    file = JsonLogFile(str(log))
    assert read_all(file) == [("stdout", "0")]
    os.rename(log, f"{log}.1")  # first rotation: the reader's file is .1
    write(log, entry("1\n"))
    os.replace(log, f"{log}.1")  # second: the reader's file is deleted (max-file 2)
    write(log, entry("2\n"))
    seen = read_all(file) + read_all(file) + read_all(file)
    assert seen == [("stdout", "1"), ("stdout", "2")]
    assert "lost" in caplog.text


def test_a_resume_in_a_file_rotated_since_reads_its_rest_then_the_new_one(
    tmp_path: Path,
) -> None:
    log = tmp_path / "c-json.log"
    write(log, entry("0\n"))
    file = JsonLogFile(str(log))
    first = lines_of(file.read())  # "0" was stored before the crash, "1" was not
    resume = FilePosition("c", file.inode, first[-1].end)
    file.close()
    write(log, entry("1\n"))
    os.rename(log, f"{log}.1")
    write(log, entry("2\n"))
    again = JsonLogFile(str(log), resume)
    seen = read_all(again) + read_all(again)
    assert [text for _, text in seen] == ["1", "2"]


def test_a_truncated_file_is_read_from_its_start_and_a_removed_one_ends_the_reader(
    tmp_path: Path,
) -> None:
    log = tmp_path / "c-json.log"
    write(log, entry("long line before\n"), entry("more\n"))
    file = JsonLogFile(str(log))
    assert len(read_all(file)) == 2
    os.truncate(log, 0)  # max-file 1: the engine empties the file in place
    assert file.read() == []
    write(log, entry("after\n"))
    assert read_all(file) == [("stdout", "after")]
    log.unlink()
    assert file.read() == []
    assert file.gone


# -- the store keeps batches whole, and where each file was read up to -----------------


def batch(texts: list[str], times: list[float], **kw: object) -> LogBatch:
    kw.setdefault("app", "shop")
    kw.setdefault("container_id", "c1")
    return LogBatch(stream="stdout", times=times, texts=texts, **kw)  # type: ignore[arg-type]


async def test_a_batch_is_one_row_and_queries_open_it_into_matching_lines(
    tmp_path: Path,
) -> None:
    async with LogStore(tmp_path / "logs.db", retention_seconds=1e12) as store:
        store.emit(LogRecord("shop", "worker says connecting", time=T0 + 1.5))
        store.emit_batch(
            batch(
                ["connection refused", "retrying", "connected fine"],
                [T0 + 1, T0 + 2, T0 + 3],
                position=FilePosition("c1", 7, 120),
            )
        )
        store.emit_batch(batch(["later"], [T0 + 4], container_id="c2"))
        await store.flush()
        assert store.statistics().rows == 3
        every = store.query(LogQuery(app="shop"))
        assert [(r.message, r.time) for r in every] == [
            ("connection refused", T0 + 1),
            ("worker says connecting", T0 + 1.5),
            ("retrying", T0 + 2),
            ("connected fine", T0 + 3),
            ("later", T0 + 4),
        ]
        assert {r.source for r in every if r.container_id} == {"container"}
        # Words match line by line, by their start, as the full-text index does.
        assert [r.message for r in store.query(LogQuery(text="conn"))] == [
            "connection refused",
            "worker says connecting",
            "connected fine",
        ]
        assert [r.message for r in store.query(LogQuery(text="refused conn"))] == [
            "connection refused"
        ]
        assert store.query(LogQuery(text="fused")) == []
        window = store.query(LogQuery(since=T0 + 2, until=T0 + 3.5, container_id="c1"))
        assert [r.message for r in window] == ["retrying", "connected fine"]
        newest = store.query(LogQuery(limit=2))
        assert [r.message for r in newest] == ["connected fine", "later"]
        assert store.file_positions() == {"c1": FilePosition("c1", 7, 120)}
        assert store.newest_lines(T0) == {"c1": (T0 + 3, 1), "c2": (T0 + 4, 1)}


async def test_a_tail_gets_a_batchs_lines_one_by_one(tmp_path: Path) -> None:
    async with LogStore(tmp_path / "logs.db") as store:
        tail = store.tail(LogQuery(text="b"))
        store.emit_batch(batch(["a 1", "b 2", "b 3"], [T0, T0 + 1, T0 + 2]))
        got = [await anext(tail), await anext(tail)]
        await tail.aclose()
    assert [(r.message, r.time) for r in got] == [("b 2", T0 + 1), ("b 3", T0 + 2)]


async def test_a_store_from_before_batches_is_opened_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "logs.db"
    with sqlite3.connect(path) as db:  # the schema of the first release of the store
        db.executescript(
            """
            CREATE TABLE logs (
                id INTEGER PRIMARY KEY, time REAL NOT NULL, app TEXT NOT NULL,
                source TEXT NOT NULL, stream TEXT NOT NULL, level TEXT NOT NULL,
                version INTEGER, class_name TEXT NOT NULL, object_id TEXT NOT NULL,
                object_name TEXT NOT NULL, container_id TEXT NOT NULL, event TEXT NOT NULL,
                fields TEXT, message TEXT NOT NULL, level_rank INTEGER NOT NULL);
            CREATE VIRTUAL TABLE logs_fts USING fts5 (
                message, content='logs', content_rowid='id');
            """
        )
        db.execute(
            "INSERT INTO logs VALUES (1, ?, 'shop', 'worker', 'stdout', 'info', NULL, '', "
            "'', '', '', '', NULL, 'kept from before', 1)",
            (T0,),
        )
        db.execute("INSERT INTO logs_fts (rowid, message) VALUES (1, 'kept from before')")
    async with LogStore(path, retention_seconds=1e12) as store:
        store.emit_batch(batch(["new line"], [T0 + 1]))
        await store.flush()
        assert [r.message for r in store.query(LogQuery())] == ["kept from before", "new line"]
        assert [r.message for r in store.query(LogQuery(text="kept"))] == ["kept from before"]


# -- real containers -------------------------------------------------------------------

pytest_docker = pytest.mark.docker


@pytest_docker
@pytest.mark.slow
async def test_lines_keep_arriving_while_the_engine_api_does_not_answer(
    docker_runtime: DockerRuntime,
    test_labels: dict[str, str],
    busybox_image: str,
) -> None:
    """Beside a local engine the lines come from its file: an outage of its API (the
    socket cut) does not hold them up, and none is lost or repeated."""
    info = await run_sh(docker_runtime, busybox_image, test_labels, GATED_COUNTER)
    sink = CollectingSink()
    proxy: EngineSocketProxy
    async with open_engine_proxy() as proxy, DockerRuntime(proxy.url) as watched:
        async with EngineWatcher(watched, test_labels, sink, retry_max=0.5):
            await until(lambda: len(sink.records) >= 300)
            await proxy.cut()
            await wait_for_count(docker_runtime, info.id, 2000)
            await docker_runtime.exec(info.id, ["touch", "/tmp/go"])
            await until(lambda: sink.messages()[-1:] == ["3999"], within=30)
            await proxy.restore()
    assert sink.messages() == [str(i) for i in range(4000)]


@pytest_docker
@pytest.mark.slow
async def test_a_watcher_killed_outright_resumes_where_the_store_has_the_file(
    docker_runtime: DockerRuntime,
    test_labels: dict[str, str],
    busybox_image: str,
    tmp_path: Path,
) -> None:
    """No cursor file and no clean close (as after SIGKILL): the positions the store
    committed with the lines are where the next watcher starts."""
    info = await run_sh(docker_runtime, busybox_image, test_labels, GATED_COUNTER)
    path = tmp_path / "logs.db"

    async def stored(store: LogStore, at_least: int) -> list[str]:
        lines: list[str] = []

        async def enough() -> bool:
            nonlocal lines
            await store.flush()
            found = store.query(LogQuery(container_id=info.id, limit=10_000))
            lines = [r.message for r in found]
            return len(lines) >= at_least

        await wait_until(enough, within=30, interval=0.1)
        return lines

    async with LogStore(path) as store:
        first = EngineWatcher(docker_runtime, test_labels, store, positions=store.file_positions)
        await first.start()
        await stored(store, 2000)
        # Gone without a word: no cursor file, nothing saved on the way out.
        await first.aclose()
    await docker_runtime.exec(info.id, ["touch", "/tmp/go"])
    async with LogStore(path) as store:
        second = EngineWatcher(docker_runtime, test_labels, store, positions=store.file_positions)
        async with second:
            lines = await stored(store, 4000)
    assert lines == [str(i) for i in range(4000)]
