"""The benchmark harness's pure parts: wrk parsing, statistics, the report, profiles.

The benchmark itself is never run here (``python -m bench``); see bench/README.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from bench.engine import unframe
from bench.profile import summarize
from bench.report import fmt_bytes, fmt_ms, fmt_ratio, markdown_table, render, targets
from bench.results import (
    BoostResult,
    BurstResult,
    ColdResult,
    FanoutResult,
    MemoryResult,
    Results,
    WakeResult,
    WarmRow,
)
from bench.scenarios import Plan, app_labels, dev_owner
from bench.stats import median, percentile
from bench.wrk import WrkResult, parse_wrk

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:40000/web/warm
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.91ms    3.12ms  48.20ms   88.12%
    Req/Sec     4.10k   312.55     4.60k    71.00%
  Latency Distribution
     50%    7.45ms
     75%    8.90ms
     90%   10.50ms
     99%    1.02s
  40812 requests in 5.01s, 5.45MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   8146.21
Transfer/sec:      1.09MB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result == WrkResult(
        requests_per_s=8146.21, p50_ms=7.45, p99_ms=1020.0, requests=40812, errors=7
    )


def test_parse_wrk_converts_microseconds_and_needs_no_error_lines() -> None:
    output = (
        WRK_OUTPUT.replace("7.45ms", "345.00us")
        .replace("  Socket errors: connect 0, read 2, write 0, timeout 1\n", "")
        .replace("  Non-2xx or 3xx responses: 4\n", "")
    )
    result = parse_wrk(output)
    assert result.p50_ms == pytest.approx(0.345)
    assert result.errors == 0


def test_parse_wrk_without_latency_distribution_says_so() -> None:
    without = WRK_OUTPUT.split("  Latency Distribution")[0] + "Requests/sec:   10.00\n"
    with pytest.raises(ValueError, match="50% latency"):
        parse_wrk(without)


def test_median_and_nearest_rank_percentile() -> None:
    samples = [float(n) for n in range(1, 201)]
    assert median(samples) == 100.5
    assert percentile(samples, 99) == 198.0
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_formatting() -> None:
    assert fmt_ms(0.25) == "0.25 ms"
    assert fmt_ms(12.34) == "12.3 ms"
    assert fmt_ms(1234.0) == "1,234 ms"
    assert fmt_ms(None) == "n/a"
    assert fmt_ratio(0.5) == "0.50x"
    assert fmt_ratio(float("nan")) == "n/a"
    assert fmt_bytes(5221.3) == "5,221 B"
    assert fmt_bytes(50 * 1024 * 1024) == "50 MiB"
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def _wrk(rps: float, p50: float) -> WrkResult:
    return WrkResult(requests_per_s=rps, p50_ms=p50, p99_ms=p50 * 3, requests=1000, errors=0)


def _results() -> Results:
    results = Results("quick", "2026-01-01T00:00:00Z", {"CPUs (nproc)": "2"}, 2.0)
    for conns, direct, nginx, dockyard in ((16, 0.35, 0.7, 1.2), (64, 1.8, 2.3, 7.9)):
        results.warm += [
            WarmRow(conns, "direct", _wrk(40_000, direct)),
            WarmRow(conns, "nginx", _wrk(25_000, nginx)),
            WarmRow(conns, "dockyard", _wrk(10_000, dockyard)),
        ]
    results.cold = ColdResult([300.0, 280.0, 290.0], [250.0, 260.0, 255.0])
    results.burst = BurstResult(200, 0, 2, [400.0] * 200)
    results.fanout = FanoutResult(50, 8000.0, 10000.0, 0)
    results.memory = MemoryResult(10_000, 60 * 1024, 110 * 1024, 109 * 1024, 0, 109 * 1024)
    return results


def test_targets_say_which_goals_are_met() -> None:
    rows = {row.target: row for row in targets(_results())}
    share = rows["warm req/s at 64 conns, Dockyard ÷ nginx"]
    assert (share.measured, share.met) == ("0.40x", False)
    added = rows["added p50 over direct at 16 conns"]
    assert (added.measured, added.met) == ("0.85 ms", True)
    cold = rows["cold start ÷ docker run → first response (medians)"]
    assert (cold.measured, cold.met) == ("1.14x", True)
    assert rows["wake from a paused sleep, p50"].met is None
    burst = rows["burst of 200 first requests to one cold object"]
    assert (burst.measured, burst.met) == ("0 errors, 2 container(s)", False)
    assert rows["fan-out to 50 cold objects ÷ parallel docker run"].met is True


def test_wake_target_is_absolute() -> None:
    results = _results()
    results.wake = WakeResult([12.0, 35.0, 20.0])
    rows = {row.target: row for row in targets(results)}
    assert rows["wake from a paused sleep, p50"].met is True
    results.wake = WakeResult([31.0])
    rows = {row.target: row for row in targets(results)}
    assert rows["wake from a paused sleep, p50"].met is False


def test_render_has_every_section_and_the_ratios() -> None:
    results = _results()
    results.notes.append("wake from sleep: skipped")
    text = render(results)
    for heading in ("Machine", "Warm path", "Starts", "Memory", "Targets", "Notes"):
        assert f"## {heading}" in text
    assert "| 64 | dockyard | 10,000 | 7.90 ms | 23.7 ms | 0 | 0.25x | 0.40x | 6.10 ms |" in text
    assert "| 1.14x |" in text  # cold start, Dockyard ÷ docker run
    assert "growth per object in that second round | 0 B |" in text
    assert "- wake from sleep: skipped" in text


def test_summarize_profile_takes_the_busiest_thread() -> None:
    raw = "\n".join(
        [
            "thread (1);main (cli.py:1);loop (a.py:1);handle (g.py:5);log (l.py:9) 30",
            "thread (1);main (cli.py:1);loop (a.py:1);handle (g.py:5);proxy (p.py:2) 60",
            "thread (1);main (cli.py:1);loop (a.py:1) 10",
            "thread (2);watch (w.py:1) 500",
            "not a sample line",
        ]
    )
    # Thread 2 has more samples, so it is the one summarised.
    total, own = summarize(raw)
    assert [(e.frame, e.share) for e in own] == [("watch (w.py:1)", 1.0)]
    assert total == []  # every frame is on every sample of that thread

    total, own = summarize(raw.replace("thread (2);watch (w.py:1) 500\n", ""))
    # main and loop are on every sample: they tell nothing and are left out.
    assert [(e.frame, round(e.share, 2)) for e in total] == [
        ("handle (g.py:5)", 0.9),
        ("proxy (p.py:2)", 0.6),
        ("log (l.py:9)", 0.3),
    ]
    assert [(e.frame, round(e.share, 2)) for e in own] == [
        ("proxy (p.py:2)", 0.6),
        ("log (l.py:9)", 0.3),
        ("loop (a.py:1)", 0.1),
    ]


def test_quick_plan_is_shorter() -> None:
    quick, full = Plan.for_mode(True), Plan.for_mode(False)
    assert quick.wrk_seconds < full.wrk_seconds
    assert quick.connections == full.connections == (1, 16, 64)
    assert 3 <= quick.boot_iterations <= full.boot_iterations


def test_boost_target_compares_medians_with_docker_run() -> None:
    results = _results()
    name = "cold start on lite with start boost ÷ docker run, 1 s boot (medians)"
    assert targets(results)[3].target == name
    assert {row.target: row for row in targets(results)}[name].met is None
    results.boost = BoostResult([1150.0, 1300.0, 1100.0], [18_000.0] * 3, [1000.0, 990.0, 1200.0])
    row = {row.target: row for row in targets(results)}[name]
    assert (row.measured, row.met) == ("1.15x", True)
    results.boost = BoostResult([1250.0], [18_000.0], [1000.0])
    assert {row.target: row for row in targets(results)}[name].met is False


def test_render_has_the_boost_section_with_medians_p90_and_ratios() -> None:
    results = _results()
    assert "## Start boost" not in render(results)
    results.boost = BoostResult(
        [1100.0, 1200.0, 1500.0], [16_000.0, 17_000.0, 20_000.0], [1000.0, 1000.0, 1200.0], [1.0]
    )
    text = render(results)
    assert "## Start boost" in text
    assert "| Dockyard, lite, start boost (n=3) | 1,200 ms | 1,500 ms | 1.20x | 1.25x |" in text
    assert "| `docker run`, no limits (n=3) | 1,000 ms | 1,200 ms | 1.00x | 1.00x |" in text
    assert "17,000 ms | 20,000 ms | 17.00x | 16.67x |" in text
    assert "1.00 s of CPU" in text


def test_unframe_joins_the_engine_log_chunks() -> None:
    def frame(stream: int, data: bytes) -> bytes:
        return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data

    raw = frame(1, b"boot work: 0.98 s of CPU\n") + frame(2, b"warning\n") + b"\x01\x00"
    assert unframe(raw) == b"boot work: 0.98 s of CPU\nwarning\n"


def test_two_runs_never_share_container_labels(tmp_path: Path) -> None:
    # Cleanup removes by these labels: a second bench on the machine has another owner.
    first, second = dev_owner(tmp_path / "a" / "app"), dev_owner(tmp_path / "b" / "app")
    assert first != second
    assert app_labels(first) == {"dockyard.app": "dockyard-bench", "dockyard.owner": first}
