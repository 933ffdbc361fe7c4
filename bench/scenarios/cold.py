"""Cold start (vs docker run of the same image) and wake from a paused sleep."""

from __future__ import annotations

import time

from ..engine import docker_run
from ..probe import bounded, first_response, timed_get
from ..results import ColdResult, WakeResult
from . import Run, progress

__all__ = ["docker_run_until_answer", "expect_ok", "run_cold", "run_wake", "show"]

COLD_OBJECT = "cold"
SLEEPY_OBJECT = "nap"


async def run_cold(run: Run, image: str) -> ColdResult:
    """First request to a stopped object, and docker run -> first response, alternating."""
    dockyard: list[float] = []
    baseline: list[float] = []
    for _ in range(run.plan.iterations):
        status, ms = await timed_get(run.session, f"{run.url}/web/{COLD_OBJECT}")
        expect_ok(status)
        dockyard.append(ms)
        await run.destroy("web", COLD_OBJECT)
        baseline.append((await docker_run_until_answer(run, image))[0])
    progress(f"cold start: Dockyard {show(dockyard)}")
    progress(f"docker run: {show(baseline)}")
    return ColdResult(dockyard, baseline)


async def docker_run_until_answer(
    run: Run, image: str, *command: str, within: float = 30
) -> tuple[float, str]:
    """docker run -> first HTTP response, in ms, and the container's output by then."""
    started = time.perf_counter()
    container_id = await docker_run(image, run.baseline_labels, *command)
    try:
        port = await run.engine.host_port(container_id)
        await bounded(first_response(port), within, f"docker run {image}: no HTTP answer")
        elapsed = (time.perf_counter() - started) * 1000
        return elapsed, await run.engine.output(container_id)
    finally:
        await run.engine.remove(container_id)


async def run_wake(run: Run) -> WakeResult:
    """Request a pausing object, wait until the engine shows it paused, time the next one."""
    url = f"{run.url}/sleepy/{SLEEPY_OBJECT}"
    samples: list[float] = []
    try:
        status, _ = await timed_get(run.session, url)  # the cold start, not measured
        expect_ok(status)
        for _ in range(run.plan.iterations):
            await bounded(
                run.engine.wait_paused(run.object_labels(SLEEPY_OBJECT)),
                30,
                "the sleepy object's container was not paused",
            )
            status, ms = await timed_get(run.session, url)
            expect_ok(status)
            samples.append(ms)
    finally:
        await run.destroy("sleepy", SLEEPY_OBJECT)
    progress(f"wake from pause: {show(samples)}")
    return WakeResult(samples)


def show(samples: list[float]) -> str:
    return " ".join(f"{ms:.0f}" for ms in samples) + " ms"


def expect_ok(status: int | None) -> None:
    if status != 200:
        raise RuntimeError(f"a first request answered {status or 'nothing'}, not 200")
