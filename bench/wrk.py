"""Running wrk and reading its ``--latency`` output."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

__all__ = ["WrkResult", "parse_wrk", "run_wrk"]

# wrk prints times with these units (see units_time in wrk's units.c).
_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors (connect, read, write, timeout) plus non-2xx/3xx answers


def parse_wrk(output: str) -> WrkResult:
    """Figures from ``wrk --latency`` output; ValueError naming what is missing."""

    def find(pattern: str, what: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output has no {what}:\n{output}")
        return match

    rps = find(r"^Requests/sec:\s+([\d.]+)", "Requests/sec line")
    p50 = find(rf"^\s*50(?:\.0+)?%\s+{_TIME}\s*$", "50% latency (was --latency given?)")
    p99 = find(rf"^\s*99(?:\.0+)?%\s+{_TIME}\s*$", "99% latency (was --latency given?)")
    requests = find(r"^\s*(\d+) requests in ", "request count")
    errors = 0
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket:
        errors += sum(int(n) for n in socket.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        p50_ms=float(p50.group(1)) * _TO_MS[p50.group(2)],
        p99_ms=float(p99.group(1)) * _TO_MS[p99.group(2)],
        requests=int(requests.group(1)),
        errors=errors,
    )


async def run_wrk(url: str, *, connections: int, seconds: float) -> WrkResult:
    """One bounded wrk run (threads = min(connections, 2)); killed if it overruns."""
    threads = min(connections, 2)
    proc = await asyncio.create_subprocess_exec(
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{text}")
    return parse_wrk(text)
