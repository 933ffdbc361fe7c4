"""``python -m bench [--quick] [--out DIR]``: run every scenario, write and print the report."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import aiohttp

from . import prereqs
from .engine import Engine
from .machine import describe_machine, load_average
from .processes import DevServer
from .profile import find_py_spy, profile_under_load, summarize_file
from .report import render
from .results import Results
from .scenarios import BASELINE_LABEL, Plan, Run, app_labels, dev_owner, progress, stage
from .scenarios.boost import run_boost
from .scenarios.burst import run_burst, run_fanout
from .scenarios.cold import run_cold, run_wake
from .scenarios.memory import run_memory
from .scenarios.warm import WARM_OBJECT, run_warm, start_warm_object

__all__ = ["main"]

T = TypeVar("T")
APP_DIR = Path(__file__).resolve().parent / "app"
SCENARIOS = ("warm", "cold", "boost", "wake", "burst", "fanout", "memory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 2.5 minutes)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="where the markdown report goes (default: bench/results)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run (default: all of {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also record dockyard dev with py-spy under 64-connection warm load",
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if unknown := only - set(SCENARIOS):
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    bench = Bench(Plan.for_mode(args.quick), only, profile=args.profile)
    try:
        results = asyncio.run(bench.run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("Interrupted; what the bench started has been stopped.", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    text = render(results)
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"{results.started_utc.replace('-', '').replace(':', '')}.md"
    report.write_text(text)
    (args.out / "latest.md").write_text(text)
    print(text)
    print(f"Written to {report} and {args.out / 'latest.md'}", file=sys.stderr)
    return 0


class Bench:
    """One run: prepare, run the chosen scenarios, and clean up whatever happens."""

    def __init__(self, plan: Plan, only: set[str], *, profile: bool) -> None:
        self.plan = plan
        self.only = only
        self.profile = profile
        self.run_id = uuid.uuid4().hex[:12]
        started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.results = Results("quick" if plan.quick else "full", started, {}, plan.wrk_seconds)

    async def run(self) -> Results:
        clock = time.monotonic()
        # SIGTERM ends the run the way Ctrl-C does: cancelled, and cleaned up on the way out.
        main_task = asyncio.current_task()
        assert main_task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
        stage("Preparing (engine, wrk, nginx, base images)")
        await prereqs.wait_for_engine()
        prereqs.ensure_tools()
        prereqs.ensure_images()
        self.results.machine = describe_machine()
        with tempfile.TemporaryDirectory(prefix="dockyard-bench-") as tmp:
            workdir = Path(tmp)
            project = workdir / "app"
            shutil.copytree(APP_DIR, project, ignore=shutil.ignore_patterns(".dockyard", "*.pyc"))
            engine = Engine()
            try:
                await self._with_app(project, workdir, engine)
                if "memory" in self.only:
                    await self._memory(project, workdir)
            finally:
                # Whatever a failure left behind: this run's baseline and app containers.
                left = await engine.remove_all({BASELINE_LABEL: self.run_id})
                left += await engine.remove_all(app_labels(dev_owner(project)))
                if left:
                    self.results.notes.append(f"removed {left} container(s) left behind")
                await engine.aclose()
        self.results.machine["load average at end"] = load_average()
        self.results.elapsed_s = time.monotonic() - clock
        return self.results

    async def _with_app(self, project: Path, workdir: Path, engine: Engine) -> None:
        """The scenarios that share one dockyard dev."""
        stage("Starting dockyard dev (builds the bench image when it changed)")
        dev = DevServer(project, workdir / "dev.log", *prereqs.dev_args())
        results, only = self.results, self.only
        try:
            url = await dev.start()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                run = Run(self.plan, url, engine, session, workdir, self.run_id, dev_owner(project))
                target = await start_warm_object(run)
                if "warm" in only:
                    stage("Warm path")
                    results.warm = await self._attempt("warm path", run_warm(run, target)) or []
                if self.profile:
                    await self._profile(run, dev)
                await run.destroy("web", WARM_OBJECT)
                if "cold" in only:
                    stage("Cold start")
                    results.cold = await self._attempt("cold start", run_cold(run, target.image))
                if "boost" in only and not prereqs.has_start_boost():
                    results.notes.append("start boost: skipped, Container has no start_boost")
                elif "boost" in only:
                    stage("Start boost (cold start of a 1 s boot on lite, 1/16 vCPU)")
                    results.boost = await self._attempt("start boost", run_boost(run))
                if "wake" in only and not prereqs.has_sleep_mode():
                    results.notes.append("wake from sleep: skipped, Container has no sleep_mode")
                elif "wake" in only:
                    stage("Wake from sleep")
                    results.wake = await self._attempt("wake", run_wake(run))
                if "burst" in only:
                    stage("Burst")
                    results.burst = await self._attempt("burst", run_burst(run))
                if "fanout" in only:
                    stage("Fan-out")
                    results.fanout = await self._attempt("fan-out", run_fanout(run, target.image))
        except Exception:
            print(f"dockyard dev's last output:\n{dev.tail()}", file=sys.stderr)
            raise
        finally:
            code = await dev.stop()
            if code not in (0, None):
                results.notes.append(f"dockyard dev exited with code {code} on SIGTERM")

    async def _memory(self, project: Path, workdir: Path) -> None:
        stage("Memory")
        idle_option = prereqs.has_idle_timeout_option()
        measured = await self._attempt(
            "memory", run_memory(self.plan, project, workdir, idle_option=idle_option)
        )
        if measured is not None:
            self.results.memory, notes = measured
            self.results.notes.extend(notes)

    async def _profile(self, run: Run, dev: DevServer) -> None:
        py_spy = find_py_spy()
        if py_spy is None:
            self.results.notes.append("profile: skipped, py-spy is not installed")
            return
        stage("Profiling dockyard dev under warm load (py-spy)")
        recorded = await self._attempt(
            "profile",
            profile_under_load(
                py_spy,
                dev.pid,
                f"{run.url}/web/{WARM_OBJECT}",
                seconds=3 if self.plan.quick else 5,
                connections=64,
                out=run.workdir / "profile.txt",
            ),
        )
        if recorded is not None:
            self.results.profile_total, self.results.profile_self = summarize_file(recorded)

    async def _attempt(self, name: str, work: Awaitable[T]) -> T | None:
        """Run one scenario; a failure becomes a note and the other scenarios still run."""
        try:
            return await work
        except Exception as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Interrupted, and a cleanup step failed on the way out: still interrupted.
                raise asyncio.CancelledError from exc
            progress(f"{name} FAILED: {type(exc).__name__}: {exc}")
            self.results.notes.append(f"{name} failed: {type(exc).__name__}: {exc}")
            return None
