"""Start boost: cold start of an app that works about 1 s at boot, on instance type lite.

Three paths, alternating in each round so drift on a busy machine hits all of them:
Dockyard's class ``Boot`` (lite, started without its CPU quota, which it gets once its
port answers), ``BootQuota`` (lite with ``start_boost = False``: 1/16 vCPU from the
first instruction), and ``docker run`` of the same image and command without limits.
"""

from __future__ import annotations

import re

from ..probe import timed_get
from ..results import BoostResult
from . import Run, progress
from .cold import docker_run_until_answer, expect_ok, show

__all__ = ["BOOT_COMMAND", "run_boost"]

# The Boot classes' entrypoint (bench/app/worker.py), given to docker run as its command.
BOOT_COMMAND = ("python3", "-u", "/srv/boot.py")
BOOSTED_OBJECT = "boot-boosted"
QUOTA_OBJECT = "boot-quota"
# 1 s of CPU at 1/16 vCPU is about 16 s; a docker run answers in about 1 s.
DOCKER_RUN_WITHIN = 60.0
BOOT_CPU = re.compile(r"boot work: ([\d.]+) s of CPU")


async def run_boost(run: Run) -> BoostResult:
    boosted: list[float] = []
    quota: list[float] = []
    baseline: list[float] = []
    cpu: list[float] = []
    image = ""
    for _ in range(run.plan.boot_iterations):
        boosted.append(await _dockyard_start(run, "boot", BOOSTED_OBJECT))
        if not image:
            image = await _image_of(run, BOOSTED_OBJECT)
        await run.destroy("boot", BOOSTED_OBJECT)
        quota.append(await _dockyard_start(run, "bootquota", QUOTA_OBJECT))
        await run.destroy("bootquota", QUOTA_OBJECT)
        ms, output = await docker_run_until_answer(
            run, image, *BOOT_COMMAND, within=DOCKER_RUN_WITHIN
        )
        baseline.append(ms)
        if match := BOOT_CPU.search(output):
            cpu.append(float(match.group(1)))
    progress(f"lite, start boost: {show(boosted)}")
    progress(f"lite, no boost:    {show(quota)}")
    progress(f"docker run:        {show(baseline)}")
    if cpu:
        progress("boot work under docker run: " + " ".join(f"{s:.2f}" for s in cpu) + " s CPU")
    return BoostResult(boosted, quota, baseline, cpu)


async def _dockyard_start(run: Run, kind: str, name: str) -> float:
    status, ms = await timed_get(run.session, f"{run.url}/{kind}/{name}")
    expect_ok(status)
    return ms


async def _image_of(run: Run, name: str) -> str:
    found = await run.engine.containers(run.object_labels(name))
    if len(found) != 1:
        raise RuntimeError(f"expected one container for {name!r}, found {len(found)}")
    return str(found[0]["Image"])
