"""The markdown report: figures, ratios and the issue's targets, from a Results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .results import PATHS, Results
from .stats import median, percentile

__all__ = [
    "TargetRow",
    "boost_section",
    "fmt_bytes",
    "fmt_ms",
    "fmt_ratio",
    "markdown_table",
    "render",
    "targets",
]


@dataclass(frozen=True, slots=True)
class TargetRow:
    target: str
    measured: str
    goal: str
    met: bool | None  # None: not measured in this run


def fmt_ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if abs(value) < 10:
        return f"{value:.2f} ms"
    if abs(value) < 100:
        return f"{value:.1f} ms"
    return f"{value:,.0f} ms"


def fmt_ratio(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}x"


def fmt_bytes(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if abs(value) >= 10 * 1024 * 1024:
        return f"{value / 1024 / 1024:,.0f} MiB"
    if abs(value) >= 10 * 1024:
        return f"{value / 1024:,.0f} KiB"
    return f"{value:,.0f} B"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _row(target: str, value: float | None, shown: str, goal: str, ok: bool) -> TargetRow:
    measured = value is not None and not math.isnan(value)
    return TargetRow(target, shown, goal, ok if measured else None)


def _rps(results: Results, path: str, connections: int) -> float | None:
    row = results.warm_row(path, connections)
    return row.requests_per_s if row is not None else None


def targets(results: Results) -> list[TargetRow]:
    """Issue 5's goals for the hot path and issue 8's for the start boost, as measured."""
    share = ratio(_rps(results, "dockyard", 64), _rps(results, "nginx", 64))
    dockyard_16 = results.warm_row("dockyard", 16)
    direct_16 = results.warm_row("direct", 16)
    added = dockyard_16.p50_ms - direct_16.p50_ms if dockyard_16 and direct_16 else None
    cold = results.cold
    cold_ratio = ratio(cold.dockyard_median, cold.docker_run_median) if cold else None
    wake = results.wake.p50 if results.wake else None
    fan = results.fanout
    fan_ratio = ratio(fan.dockyard_ms, fan.docker_run_ms) if fan else None
    burst = results.burst
    boost = results.boost
    boost_ratio = ratio(median(boost.boosted_ms), median(boost.docker_run_ms)) if boost else None
    return [
        _row(
            "warm req/s at 64 conns, Dockyard ÷ nginx",
            share,
            fmt_ratio(share),
            "≥ 0.50x",
            share is not None and share >= 0.5,
        ),
        _row(
            "added p50 over direct at 16 conns",
            added,
            fmt_ms(added),
            "≤ 1 ms",
            added is not None and added <= 1.0,
        ),
        _row(
            "cold start ÷ docker run → first response (medians)",
            cold_ratio,
            fmt_ratio(cold_ratio),
            "≤ 1.15x",
            cold_ratio is not None and cold_ratio <= 1.15,
        ),
        _row(
            "cold start on lite with start boost ÷ docker run, 1 s boot (medians)",
            boost_ratio,
            fmt_ratio(boost_ratio),
            "≤ 1.20x",
            boost_ratio is not None and boost_ratio <= 1.2,
        ),
        _row("wake from a paused sleep, p50", wake, fmt_ms(wake), "≤ 30 ms", (wake or 0) <= 30),
        TargetRow(
            f"burst of {burst.requests if burst else 200} first requests to one cold object",
            f"{burst.errors} errors, {burst.containers_started} container(s)" if burst else "n/a",
            "0 errors, exactly 1 container",
            None if burst is None else burst.errors == 0 and burst.containers_started == 1,
        ),
        _row(
            f"fan-out to {fan.objects if fan else 50} cold objects ÷ parallel docker run",
            fan_ratio,
            fmt_ratio(fan_ratio)
            + (f" ({fan.dockyard_errors} errors)" if fan and fan.dockyard_errors else ""),
            "≤ 1.30x",
            fan_ratio is not None
            and fan_ratio <= 1.3
            and fan is not None
            and not fan.dockyard_errors,
        ),
    ]


def warm_section(results: Results) -> str:
    rows = []
    for conns in sorted({row.connections for row in results.warm}):
        direct = results.warm_row("direct", conns)
        for path in PATHS:
            wrk = results.warm_row(path, conns)
            if wrk is None:
                continue
            rows.append(
                [
                    str(conns),
                    path,
                    f"{wrk.requests_per_s:,.0f}",
                    fmt_ms(wrk.p50_ms),
                    fmt_ms(wrk.p99_ms),
                    str(wrk.errors),
                    fmt_ratio(ratio(wrk.requests_per_s, _rps(results, "direct", conns))),
                    fmt_ratio(ratio(wrk.requests_per_s, _rps(results, "nginx", conns))),
                    fmt_ms(wrk.p50_ms - direct.p50_ms) if direct else "n/a",
                ]
            )
    headers = [
        "conns",
        "path",
        "req/s",
        "p50",
        "p99",
        "errors",
        "÷ direct",
        "÷ nginx",
        "p50 - direct",
    ]
    title = f"## Warm path (wrk, {results.wrk_seconds:g} s per run, threads = min(conns, 2))"
    return f"{title}\n\n{markdown_table(headers, rows)}"


def starts_section(results: Results) -> str:
    rows = []
    cold = results.cold
    if cold:
        rows.append(
            [
                f"cold start, median of {len(cold.dockyard_ms)}",
                fmt_ms(cold.dockyard_median),
                f"docker run → first response, median of {len(cold.docker_run_ms)}: "
                f"{fmt_ms(cold.docker_run_median)}",
                fmt_ratio(ratio(cold.dockyard_median, cold.docker_run_median)),
            ]
        )
    if results.wake:
        cold_median = cold.dockyard_median if cold else None
        rows.append(
            [
                f"wake from pause, median of {len(results.wake.samples_ms)}",
                fmt_ms(results.wake.p50),
                f"Dockyard cold start: {fmt_ms(cold_median)}",
                fmt_ratio(ratio(results.wake.p50, cold_median)),
            ]
        )
    if results.burst:
        burst = results.burst
        rows.append(
            [
                f"burst: {burst.requests} concurrent first requests to one cold object",
                f"p50 {fmt_ms(burst.p50)}, p99 {fmt_ms(burst.p99)}; {burst.errors} errors; "
                f"{burst.containers_started} container(s) started",
                "—",
                "—",
            ]
        )
    if results.fanout:
        fan = results.fanout
        errors = f" ({fan.dockyard_errors} errors)" if fan.dockyard_errors else ""
        rows.append(
            [
                f"fan-out: {fan.objects} distinct cold objects at once, until all answered",
                fmt_ms(fan.dockyard_ms) + errors,
                f"{fan.objects} parallel docker run → first response: {fmt_ms(fan.docker_run_ms)}",
                fmt_ratio(ratio(fan.dockyard_ms, fan.docker_run_ms)),
            ]
        )
    if not rows:
        return ""
    headers = ["scenario", "Dockyard", "baseline", "Dockyard ÷ baseline"]
    return f"## Starts\n\n{markdown_table(headers, rows)}"


def boost_section(results: Results) -> str:
    boost = results.boost
    if boost is None:
        return ""
    base_median = median(boost.docker_run_ms)
    base_p90 = percentile(boost.docker_run_ms, 90)
    rows = []
    for label, samples in (
        ("Dockyard, lite, start boost", boost.boosted_ms),
        ("Dockyard, lite, `start_boost = False`", boost.quota_ms),
        ("`docker run`, no limits", boost.docker_run_ms),
    ):
        mid, p90 = median(samples), percentile(samples, 90)
        rows.append(
            [
                f"{label} (n={len(samples)})",
                fmt_ms(mid),
                fmt_ms(p90),
                fmt_ratio(ratio(mid, base_median)),
                fmt_ratio(ratio(p90, base_p90)),
            ]
        )
    headers = ["path", "median", "p90", "median ÷ docker run", "p90 ÷ docker run"]
    cpu = (
        f" The boot work took {median(boost.boot_cpu_s):.2f} s of CPU (median, as the "
        "container measured it under docker run)."
        if boost.boot_cpu_s
        else ""
    )
    return (
        "## Start boost (first request → response; a Python app that works before it "
        "listens, instance type lite = 1/16 vCPU)\n\n"
        + markdown_table(headers, rows)
        + f"\n\nDockyard's object is destroyed between tries; the three paths alternate.{cpu}"
    )


def memory_section(results: Results) -> str:
    memory = results.memory
    if memory is None:
        return ""
    kib = 1024
    rows = [
        ["dockyard dev RSS before", fmt_bytes(memory.baseline_kib * kib)],
        [f"with {memory.objects:,} objects touched (live)", fmt_bytes(memory.touched_kib * kib)],
        ["per object, live", fmt_bytes(memory.per_object_live)],
    ]
    if memory.evicted_kib is not None:
        live = "unknown" if memory.live_after is None else f"{memory.live_after:,} still live"
        rows += [
            [f"after eviction ({live})", fmt_bytes(memory.evicted_kib * kib)],
            ["per object, after eviction", fmt_bytes(memory.per_object_evicted)],
        ]
    if memory.second_kib is not None:
        rows += [
            [
                f"after touching and evicting {memory.objects:,} other objects",
                fmt_bytes(memory.second_kib * kib),
            ],
            ["growth per object in that second round", fmt_bytes(memory.per_object_second)],
        ]
    return f"## Memory (idle plain Durable Objects)\n\n{markdown_table(['', 'RSS'], rows)}"


def targets_section(results: Results) -> str:
    marks = {True: "yes", False: "**no**", None: "not measured"}
    rows = [[t.target, t.measured, t.goal, marks[t.met]] for t in targets(results)]
    return "## Targets (issues 5 and 8)\n\n" + markdown_table(
        ["target", "measured", "goal", "met"], rows
    )


def profile_section(results: Results) -> str:
    if not results.profile_total:
        return ""
    parts = ["## Profile of dockyard dev during the 64-connection warm run (py-spy)"]
    for title, entries in (
        ("Inclusive (share of the event loop thread's samples)", results.profile_total),
        ("Own time", results.profile_self),
    ):
        rows = [[f"{e.share * 100:.1f}%", f"`{e.frame}`"] for e in entries]
        parts.append(f"{title}:\n\n{markdown_table(['share', 'frame'], rows)}")
    return "\n\n".join(parts)


METHOD = """\
- One container image for every path: a stdlib asyncio HTTP/1.1 server (bench/app/container)
  on `dockyard/python:bookworm`, answering `ok` with keep-alive.
- Dockyard is `dockyard dev` (access log off, as nginx's is) serving bench/app: gateway ->
  worker -> Durable Object -> container, the container with 2 vCPU and 1 GiB.
- direct is the container's published 127.0.0.1 port; nginx is one worker process with an
  upstream `keepalive 64` in front of that same port.
- Dockyard, run as root beside the local engine, connects to the container's port on the
  container's own loopback (a socket made in its network namespace), so Docker's
  `docker-proxy` is on the direct and nginx paths but not on Dockyard's.
- docker run is the docker CLI (`docker run -d -p 127.0.0.1::8080 IMAGE`, as a user would
  run it, without limits or init), then the port from the Engine API, then HTTP polled every
  millisecond until a status line comes back. Dockyard starts containers through the Engine
  API with limits and an init process.
- Start boost: bench/app/container/boot.py imports standard library modules and compiles
  standard library sources (a fixed amount of work, about 1 s of CPU) before it serves as
  server.py does. Classes Boot and BootQuota run it on instance type lite (1/16 vCPU),
  with the start boost and with `start_boost = False`; `docker run IMAGE python3 -u
  /srv/boot.py` runs it without limits.
- wrk, the bench, Dockyard, nginx and the container share the machine's CPUs."""


def render(results: Results) -> str:
    machine = markdown_table(["", ""], [[k, v] for k, v in results.machine.items()])
    sections = [
        f"# Dockyard benchmark, {results.started_utc} ({results.mode}, {results.elapsed_s:.0f} s)",
        f"## Machine\n\n{machine}",
        warm_section(results) if results.warm else "",
        starts_section(results),
        boost_section(results),
        memory_section(results),
        targets_section(results),
        f"## Method\n\n{METHOD}",
        profile_section(results),
        "## Notes\n\n" + "\n".join(f"- {note}" for note in results.notes) if results.notes else "",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"
