"""Log ingest: how many records/s the LogStore keeps while the event loop stays responsive.

Emits records at a fixed rate (default 20,000/s for 10 s) from an asyncio loop, in ticks
of 10 ms the way a busy node's watchers would, then flushes and counts what was stored.
Meanwhile a probe task measures the loop's lag (how late a 5 ms sleep wakes up), which is
what requests would feel. The baseline is the same loop emitting into a sink that keeps
nothing, in the same run, so a busy shared machine shows up in both. CPU is the
process's (loop + writer thread + SQLite).

    .venv/bin/python -m bench.scenarios.log_ingest [--rate 20000] [--seconds 10] [--dir D]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dockyard.observe.logstore import LogStore
from dockyard.observe.records import LogRecord

from ..stats import median, percentile
from . import progress, stage

__all__ = ["Drive", "IngestResult", "drive", "run_log_ingest"]

TICK = 0.010  # seconds between emit bursts
PROBE = 0.005  # the lag probe's sleep
WORDS = "request served upstream cache miss object alarm retry container stdout".split()


@dataclass(frozen=True, slots=True)
class Drive:
    """One emitting phase: what the loop felt while records went into a sink."""

    emitted: int
    seconds: float
    emit_us_per_record: float  # wall time inside emit(), per record
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    cpu_seconds: float  # the whole process (loop, writer thread, SQLite)


@dataclass(frozen=True, slots=True)
class IngestResult:
    baseline: Drive  # the same loop emitting into a sink that keeps nothing
    store: Drive
    stored: int
    dropped: int
    drain_seconds: float  # from the last emit until everything was committed
    drain_cpu_seconds: float
    database_bytes: int

    @property
    def stored_per_s(self) -> float:
        return self.stored / (self.store.seconds + self.drain_seconds)


async def drive(emit: Callable[[LogRecord], None], *, rate: int, seconds: float) -> Drive:
    """Emit ``rate`` records/s for ``seconds`` in ticks of TICK, while a probe task
    measures how late a PROBE-long sleep wakes up (what a request would feel)."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(PROBE)
            lags.append((time.perf_counter() - before - PROBE) * 1000)

    prober = asyncio.create_task(probe())
    try:
        cpu0 = time.process_time()
        started = time.perf_counter()
        emitted, in_emit, tick = 0, 0.0, 0
        while (now := time.perf_counter()) - started < seconds:
            # Catch up to the schedule: the rate holds even when a tick runs late.
            due = int((now - started) * rate) - emitted
            records = [_record(i) for i in range(emitted, emitted + due)]
            t0 = time.perf_counter()
            for record in records:
                emit(record)
            in_emit += time.perf_counter() - t0
            emitted += due
            tick += 1
            await asyncio.sleep(max(0.0, started + tick * TICK - time.perf_counter()))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    finally:
        stop.set()
        await prober
    return Drive(
        emitted=emitted,
        seconds=elapsed,
        emit_us_per_record=in_emit / max(1, emitted) * 1e6,
        lag_p50_ms=median(lags),
        lag_p99_ms=percentile(lags, 99),
        lag_max_ms=max(lags, default=0.0),
        cpu_seconds=cpu,
    )


async def run_log_ingest(path: Path, *, rate: int, seconds: float) -> IngestResult:
    kept: list[int] = [0]

    def discard(record: LogRecord) -> None:
        kept[0] += 1

    baseline = await drive(discard, rate=rate, seconds=seconds)
    async with LogStore(path) as store:
        driven = await drive(store.emit, rate=rate, seconds=seconds)
        cpu0, t0 = time.process_time(), time.perf_counter()
        await store.flush()
        drain, drain_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stats = store.statistics()
    return IngestResult(
        baseline=baseline,
        store=driven,
        stored=stats.rows,
        dropped=stats.dropped,
        drain_seconds=drain,
        drain_cpu_seconds=drain_cpu,
        database_bytes=stats.bytes,
    )


def _record(i: int) -> LogRecord:
    words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(6))
    return LogRecord(
        app=f"app-{i % 4}",
        message=f"line {i}: {words} in {i % 997} ms",
        source="container",
        level="error" if i % 50 == 0 else "info",
        class_name="Web",
        object_id=f"{i % 64:064x}",
        object_name=f"obj-{i % 64}",
        container_id=f"{i % 16:064x}",
    )


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios.log_ingest")
    parser.add_argument("--rate", type=int, default=20_000, help="records per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--dir", type=Path, default=None, help="where the database goes")
    args = parser.parse_args()
    stage(f"log ingest: {args.rate:,} records/s for {args.seconds:g} s")
    progress(f"CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} CPUs)")
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        result = asyncio.run(
            run_log_ingest(Path(scratch) / "logs.db", rate=args.rate, seconds=args.seconds)
        )
    r = result
    for name, d in (("no store (baseline)", r.baseline), ("LogStore", r.store)):
        progress(
            f"{name:<20} {d.emitted:,} emitted in {d.seconds:.2f} s; emit() "
            f"{d.emit_us_per_record:.2f} us/record; loop lag p50 {d.lag_p50_ms:.2f} ms, "
            f"p99 {d.lag_p99_ms:.2f} ms, max {d.lag_max_ms:.1f} ms; CPU {d.cpu_seconds:.2f} s"
        )
    progress(
        f"stored {r.stored:,} of {r.store.emitted:,} ({r.dropped:,} dropped), "
        f"{r.stored_per_s:,.0f} records/s including the drain after the last emit "
        f"({r.drain_seconds:.2f} s, CPU {r.drain_cpu_seconds:.2f} s)"
    )
    cpu = r.store.cpu_seconds + r.drain_cpu_seconds
    progress(
        f"LogStore CPU {cpu:.2f} s = {cpu / max(1, r.stored) * 1e6:.1f} us/record "
        f"(baseline {r.baseline.cpu_seconds / max(1, r.baseline.emitted) * 1e6:.1f}); "
        f"database {r.database_bytes / 1e6:.1f} MB "
        f"({r.database_bytes / max(1, r.stored):.0f} B/record)"
    )
    progress(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0 if r.stored == r.store.emitted else 1


if __name__ == "__main__":
    raise SystemExit(main())
