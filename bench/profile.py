"""py-spy against dockyard dev under warm load, and a summary of its collapsed stacks."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import Counter
from pathlib import Path

from .results import ProfileEntry
from .wrk import run_wrk

__all__ = ["find_py_spy", "profile_under_load", "summarize", "summarize_file"]

RATE = 250  # samples per second


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def profile_under_load(
    py_spy: str, pid: int, url: str, *, seconds: float, connections: int, out: Path
) -> Path:
    """Record ``pid`` while wrk loads ``url``; returns ``out``, py-spy's raw collapsed stacks."""
    load = asyncio.create_task(run_wrk(url, connections=connections, seconds=seconds + 2))
    try:
        proc = await asyncio.create_subprocess_exec(
            py_spy,
            *("record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate", str(RATE)),
            # --function: one entry per function, not per line being run.
            *("--format", "raw", "--threads", "--function", "--output", str(out)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        said, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"py-spy failed ({proc.returncode}): {said.decode()[-2000:]}")
    finally:
        await load
    return out


def summarize_file(path: Path, top: int = 12) -> tuple[list[ProfileEntry], list[ProfileEntry]]:
    return summarize(path.read_text(), top)


def summarize(raw: str, top: int = 12) -> tuple[list[ProfileEntry], list[ProfileEntry]]:
    """(inclusive, own-time) top frames of the busiest thread in py-spy's raw output.

    Frames on (nearly) every sample, such as the CLI and the event loop's entry, say
    nothing about where time goes and are left out of the inclusive list.
    """
    threads: dict[str, list[tuple[list[str], int]]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames.pop(0) if frames[0].startswith("thread (") else "thread"
        threads.setdefault(thread, []).append((frames, int(count)))
    if not threads:
        return [], []
    stacks = max(threads.values(), key=lambda s: sum(n for _, n in s))
    total = sum(n for _, n in stacks)
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for frames, n in stacks:
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
    informative = [(f, n) for f, n in inclusive.most_common() if n < 0.97 * total]
    return (
        [ProfileEntry(n / total, f) for f, n in informative[:top]],
        [ProfileEntry(n / total, f) for f, n in own.most_common(top)],
    )
