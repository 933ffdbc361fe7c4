"""Burst (many first requests to one cold object) and fan-out (many cold objects at once)."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from ..engine import docker_run
from ..probe import bounded, first_response, timed_get
from ..results import BurstResult, FanoutResult
from . import Run, progress

__all__ = ["run_burst", "run_fanout"]

BURST_OBJECT = "burst"


def _clients(limit: int = 0) -> aiohttp.ClientSession:
    # A connection per request, as that many separate clients would have.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=True),
        timeout=aiohttp.ClientTimeout(total=120),
    )


async def run_burst(run: Run) -> BurstResult:
    url = f"{run.url}/web/{BURST_OBJECT}"
    since = time.time()
    try:
        async with _clients() as clients:
            answers = await asyncio.gather(
                *(timed_get(clients, url) for _ in range(run.plan.burst))
            )
        # The engine's events count every start, also of a container that already ended.
        started = await run.engine.starts(run.object_labels(BURST_OBJECT), since, time.time())
    finally:
        await run.destroy("web", BURST_OBJECT)
    errors = sum(1 for status, _ in answers if status != 200)
    result = BurstResult(len(answers), errors, started, [ms for _, ms in answers])
    progress(
        f"burst: p50 {result.p50:.0f} ms, p99 {result.p99:.0f} ms, {errors} errors, "
        f"{started} container(s) started"
    )
    return result


async def run_fanout(run: Run, image: str) -> FanoutResult:
    names = [f"fan-{i}" for i in range(run.plan.fanout)]
    try:
        async with _clients() as clients:
            started = time.perf_counter()
            answers = await asyncio.gather(
                *(timed_get(clients, f"{run.url}/web/{name}") for name in names)
            )
            dockyard_ms = (time.perf_counter() - started) * 1000
    finally:
        await asyncio.gather(*(run.destroy("web", name) for name in names))
    errors = sum(1 for status, _ in answers if status != 200)
    progress(f"fan-out: Dockyard {dockyard_ms:.0f} ms for {len(names)} objects, {errors} errors")
    started = time.perf_counter()
    ids = await asyncio.gather(*(_docker_run_until_answer(run, image) for _ in names))
    docker_ms = (time.perf_counter() - started) * 1000
    await asyncio.gather(*(run.engine.remove(container_id) for container_id in ids))
    progress(f"fan-out: {len(names)} parallel docker run {docker_ms:.0f} ms")
    return FanoutResult(len(names), dockyard_ms, docker_ms, errors)


async def _docker_run_until_answer(run: Run, image: str) -> str:
    container_id = await docker_run(image, run.baseline_labels)
    port = await run.engine.host_port(container_id)
    await bounded(first_response(port), 60, f"docker run {image}: no HTTP answer")
    return container_id
