"""Warm path: wrk through Dockyard, straight to the container, and through nginx."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import EngineError
from ..processes import Nginx
from ..results import PATHS, WarmRow
from ..wrk import run_wrk
from . import Run, progress

__all__ = ["WARM_OBJECT", "WarmTarget", "run_warm", "start_warm_object"]

WARM_OBJECT = "warm"


@dataclass(frozen=True, slots=True)
class WarmTarget:
    """The warm object's container: its published port and its image."""

    port: int
    image: str


async def start_warm_object(run: Run) -> WarmTarget:
    async with run.session.get(f"{run.url}/web/{WARM_OBJECT}") as response:
        if response.status != 200:
            raise RuntimeError(f"warm object answered {response.status}: {await response.text()}")
    found = await run.engine.containers(run.object_labels(WARM_OBJECT))
    if len(found) != 1:
        raise EngineError(f"expected one container for {WARM_OBJECT!r}, found {len(found)}")
    container_id = found[0]["Id"]
    return WarmTarget(await run.engine.host_port(container_id), found[0]["Image"])


async def run_warm(run: Run, target: WarmTarget) -> list[WarmRow]:
    nginx = Nginx(target.port, run.workdir / "nginx")
    try:
        nginx_port = await nginx.start()
        urls = {
            "direct": f"http://127.0.0.1:{target.port}/",
            "nginx": f"http://127.0.0.1:{nginx_port}/",
            "dockyard": f"{run.url}/web/{WARM_OBJECT}",
        }
        # Fill connection pools and caches before anything is measured.
        for url in urls.values():
            await run_wrk(url, connections=16, seconds=run.plan.warmup_seconds)
        rows = []
        for connections in run.plan.connections:
            # Paths alternate at each level, so drift on a busy machine hits all three.
            for path in PATHS:
                result = await run_wrk(
                    urls[path], connections=connections, seconds=run.plan.wrk_seconds
                )
                rows.append(WarmRow(connections, path, result))
                progress(
                    f"{connections:>3} conns {path:<8} {result.requests_per_s:>9,.0f} req/s  "
                    f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
                    + (f"  {result.errors} errors" if result.errors else "")
                )
        return rows
    finally:
        await nginx.stop()
