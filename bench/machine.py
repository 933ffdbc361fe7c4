"""A description of the machine a run happened on, for the report."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

__all__ = ["describe_machine", "load_average"]


def describe_machine() -> dict[str, str]:
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    return {
        "CPUs (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU model": model.group(1).strip() if model else "unknown",
        "memory": f"{int(meminfo.group(1)) / 1024 / 1024:.1f} GiB" if meminfo else "unknown",
        "kernel": f"{platform.system()} {platform.release()}",
        "docker engine": _command(["docker", "version", "--format", "{{.Server.Version}}"]),
        "python": sys.version.split()[0],
        "wrk": _command(["wrk", "-v"]).split(" [")[0].removeprefix("wrk "),
        "nginx": _command(["nginx", "-v"]).rpartition("/")[2],
        "load average at start": load_average(),
    }


def load_average() -> str:
    return " ".join(_read("/proc/loadavg").split()[:3]) or "unknown"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _command(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    # wrk -v and nginx -v print to stderr and exit non-zero; the first line is what counts.
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0].strip() if text else "unknown"
