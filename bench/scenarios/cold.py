"""Cold start (vs docker run of the same image) and wake from a paused sleep."""

from __future__ import annotations

import time

from ..engine import docker_run
from ..probe import bounded, first_response, timed_get
from ..results import ColdResult, WakeResult
from . import Run, object_labels, progress

__all__ = ["run_cold", "run_wake"]

COLD_OBJECT = "cold"
SLEEPY_OBJECT = "nap"


async def run_cold(run: Run, image: str) -> ColdResult:
    """First request to a stopped object, and docker run -> first response, alternating."""
    dockyard: list[float] = []
    baseline: list[float] = []
    for _ in range(run.plan.iterations):
        status, ms = await timed_get(run.session, f"{run.url}/web/{COLD_OBJECT}")
        _expect_ok(status)
        dockyard.append(ms)
        await run.destroy("web", COLD_OBJECT)
        baseline.append(await _docker_run_until_answer(run, image))
    progress(f"cold start: Dockyard {_show(dockyard)}")
    progress(f"docker run: {_show(baseline)}")
    return ColdResult(dockyard, baseline)


async def _docker_run_until_answer(run: Run, image: str) -> float:
    started = time.perf_counter()
    container_id = await docker_run(image, run.baseline_labels)
    try:
        port = await run.engine.host_port(container_id)
        await bounded(first_response(port), 30, f"docker run {image}: no HTTP answer")
        return (time.perf_counter() - started) * 1000
    finally:
        await run.engine.remove(container_id)


async def run_wake(run: Run) -> WakeResult:
    """Request a pausing object, wait until the engine shows it paused, time the next one."""
    url = f"{run.url}/sleepy/{SLEEPY_OBJECT}"
    samples: list[float] = []
    try:
        status, _ = await timed_get(run.session, url)  # the cold start, not measured
        _expect_ok(status)
        for _ in range(run.plan.iterations):
            await bounded(
                run.engine.wait_paused(object_labels(SLEEPY_OBJECT)),
                30,
                "the sleepy object's container was not paused",
            )
            status, ms = await timed_get(run.session, url)
            _expect_ok(status)
            samples.append(ms)
    finally:
        await run.destroy("sleepy", SLEEPY_OBJECT)
    progress(f"wake from pause: {_show(samples)}")
    return WakeResult(samples)


def _show(samples: list[float]) -> str:
    return " ".join(f"{ms:.0f}" for ms in samples) + " ms"


def _expect_ok(status: int | None) -> None:
    if status != 200:
        raise RuntimeError(f"a first request answered {status or 'nothing'}, not 200")
