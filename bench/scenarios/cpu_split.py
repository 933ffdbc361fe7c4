"""Whose CPU a warm request costs, process by process, under wrk on the real servers.

``python -m bench.scenarios.cpu_split [--connections C] [--seconds S] [--rounds R]``

``dockyard dev`` serves the bench app; its warm object's container is then driven by wrk
straight ("direct"), through nginx (one worker, keep-alive upstream) and through Dockyard,
the three alternating in each round. For each run it reports CPU per request of each
party: Dockyard's process, nginx's worker, ``docker-proxy`` (which the published port goes
through), the container (its cgroup), wrk itself, and the whole machine (``/proc/stat``),
with the machine's busy share. Where one process is at a whole CPU while the machine has
idle time, that process is what limits throughput, and its CPU per request is the figure
to cut.

Everything listens on 127.0.0.1; dev is stopped with SIGTERM (it stops its containers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import aiohttp

from ..engine import Engine
from ..machine import describe_machine, load_average
from ..processes import DevServer, Nginx
from ..wrk import run_wrk
from . import app_labels, dev_owner

APP = Path(__file__).resolve().parents[1] / "app"
OBJECT = "cpu-split"
TICK = os.sysconf("SC_CLK_TCK")
PARTIES = ["dockyard", "nginx", "docker-proxy", "container", "wrk", "machine"]


def process_seconds(pid: int) -> float:
    """User plus system CPU of one process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def processes(match: Callable[[int, str], bool]) -> list[int]:
    """Pids whose (parent pid, command line) match."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if match(parent, cmdline):
            found.append(int(entry.name))
    return found


def container_seconds(container_id: str) -> float:
    """CPU the container's cgroup used so far (cgroup v1 or v2, as Docker lays them out)."""
    for path, scale in (
        (f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage", 1e-9),
        (f"/sys/fs/cgroup/cpuacct/system.slice/docker-{container_id}.scope/cpuacct.usage", 1e-9),
        (f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat", 1e-6),
        (f"/sys/fs/cgroup/docker/{container_id}/cpu.stat", 1e-6),
    ):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        if text.startswith("usage_usec"):
            text = text.split()[1]
        return int(text.split()[0]) * scale
    raise RuntimeError(f"no cgroup CPU accounting found for container {container_id[:12]}")


def machine_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle and iowait
    return (sum(values) - idle) / TICK, sum(values) / TICK


class Meter:
    """CPU seconds of every party, read before and after a run."""

    def __init__(self, dev_pid: int, nginx_pid: int, container_id: str) -> None:
        self.dev_pid = dev_pid
        self.nginx_pid = nginx_pid
        self.container_id = container_id

    def read(self) -> dict[str, float]:
        nginx = processes(lambda parent, _: parent == self.nginx_pid)
        proxies = processes(lambda _, cmdline: "docker-proxy" in cmdline)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once waited for
        busy, total = machine_seconds()
        return {
            "dockyard": process_seconds(self.dev_pid),
            "nginx": sum(process_seconds(pid) for pid in nginx),
            "docker-proxy": sum(process_seconds(pid) for pid in proxies),
            "container": container_seconds(self.container_id),
            "wrk": children.ru_utime + children.ru_stime,
            "machine": busy,
            "total": total,
        }


async def measure(
    meter: Meter, url: str, connections: int, seconds: int
) -> tuple[float, dict[str, float], float]:
    """(req/s, µs of CPU per request by party, the machine's busy share) of one wrk run."""
    before = meter.read()
    result = await run_wrk(url, connections=connections, seconds=seconds)
    after = meter.read()
    if result.errors or not result.requests:
        raise RuntimeError(f"{url}: {result.errors} errors in {result.requests} requests")
    per_request = {
        party: (after[party] - before[party]) / result.requests * 1e6 for party in PARTIES
    }
    busy = (after["machine"] - before["machine"]) / (after["total"] - before["total"])
    return result.requests_per_s, per_request, busy


async def main(connections: int, seconds: int, rounds: int) -> int:
    machine = describe_machine()
    print(f"CPU {machine.get('CPU model', '?')}, load average {load_average()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="dockyard-cpu-split-"))
    dev = DevServer(APP, workdir / "dev.log", "--no-access-log")
    nginx: Nginx | None = None
    rows: dict[str, list[tuple[float, dict[str, float], float]]] = {}
    try:
        url = await dev.start()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/web/{OBJECT}") as response:
                if response.status != 200:
                    raise RuntimeError(f"the warm object answered {response.status}")
        engine = Engine()
        try:
            labels = {**app_labels(dev_owner(APP)), "dockyard.object_name": OBJECT}
            found = await engine.containers(labels)
            if len(found) != 1:
                raise RuntimeError(f"expected one container for {OBJECT!r}, found {len(found)}")
            container_id = found[0]["Id"]
            port = await engine.host_port(container_id)
        finally:
            await engine.aclose()
        nginx = Nginx(port, workdir / "nginx")
        nginx_port = await nginx.start()
        assert nginx.proc is not None
        meter = Meter(dev.pid, nginx.proc.pid, container_id)
        urls = {
            "direct": f"http://127.0.0.1:{port}/",
            "nginx": f"http://127.0.0.1:{nginx_port}/",
            "dockyard": f"{url}/web/{OBJECT}",
        }
        for target in urls.values():  # pools, caches and first calls, unmeasured
            await run_wrk(target, connections=16, seconds=2)
        for round_number in range(rounds):
            for path, target in urls.items():
                rate, cost, busy = await measure(meter, target, connections, seconds)
                rows.setdefault(path, []).append((rate, cost, busy))
                print(
                    f"round {round_number + 1} {path:<9} {rate:8,.0f} req/s  "
                    + "  ".join(f"{party} {cost[party]:.1f}" for party in PARTIES)
                    + f"  busy {busy:.0%}",
                    flush=True,
                )
    finally:
        if nginx is not None:
            await nginx.stop()
        await dev.stop()
    print(
        f"\nµs of CPU per request, median of {rounds} rounds ({connections} connections, "
        f"{seconds} s each; CPU {machine.get('CPU model', '?')}):\n"
    )
    print("| path | req/s | " + " | ".join(PARTIES) + " | machine busy |")
    print("|---|---|" + "---|" * len(PARTIES) + "---|")
    for path, runs in rows.items():
        rate = statistics.median(r for r, _, _ in runs)
        costs = [statistics.median(c[party] for _, c, _ in runs) for party in PARTIES]
        busy = statistics.median(b for _, _, b in runs)
        print(
            f"| {path} | {rate:,.0f} | "
            + " | ".join(f"{c:.1f}" for c in costs)
            + f" | {busy:.0%} |"
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios.cpu_split")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.connections, args.seconds, args.rounds)))
