"""One module per scenario; each measures Dockyard and its baseline in the same run."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ..engine import Engine
from ..probe import bounded

__all__ = ["APP", "BASELINE_LABEL", "Plan", "Run", "app_labels", "dev_owner", "progress", "stage"]

# The bench app's name (bench/app/wrangler.jsonc): its containers carry dockyard.app=APP.
APP = "dockyard-bench"
# Baseline containers (plain docker run) carry this label with the run's id.
BASELINE_LABEL = "dockyard.bench"


@dataclass(frozen=True, slots=True)
class Plan:
    """How much of each scenario to run: ``--quick`` and the full run differ only here."""

    quick: bool
    wrk_seconds: float
    warmup_seconds: float
    connections: tuple[int, ...]
    iterations: int  # cold start and wake samples
    boot_iterations: int  # start boost samples, each of the three paths
    burst: int
    fanout: int
    objects: int  # memory scenario

    @classmethod
    def for_mode(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 2, 1, (1, 16, 64), 10, 3, 200, 50, 10_000)
        return cls(False, 5, 2, (1, 16, 64), 10, 5, 200, 50, 10_000)


@dataclass(frozen=True, slots=True)
class Run:
    """What every scenario works with: the running app, the engine, a scratch folder."""

    plan: Plan
    url: str  # dockyard dev's base URL
    engine: Engine
    session: aiohttp.ClientSession  # to dockyard dev, keep-alive
    workdir: Path
    run_id: str
    owner: str  # the dockyard.owner label of this run's dockyard dev (see dev_owner)

    @property
    def baseline_labels(self) -> dict[str, str]:
        return {BASELINE_LABEL: self.run_id}

    async def destroy(self, kind: str, name: str) -> None:
        """Make object ``name`` cold again: kill its container and wait until it is gone."""
        async with self.session.get(f"{self.url}/destroy/{kind}/{name}") as response:
            if response.status != 200:
                raise RuntimeError(f"destroy {kind}/{name}: {response.status}")
        await bounded(self.engine.wait_gone(self.object_labels(name)), 30, f"{name} not removed")

    def object_labels(self, name: str) -> dict[str, str]:
        """Labels of object ``name``'s container in this run (not another bench's)."""
        return {**app_labels(self.owner), "dockyard.object_name": name}


def app_labels(owner: str) -> dict[str, str]:
    """Labels of the containers of one dockyard dev of the bench app: two bench runs at
    once (on a shared machine) must never count or remove each other's containers."""
    return {"dockyard.app": APP, "dockyard.owner": owner}


def dev_owner(project: Path) -> str:
    from dockyard.containers.labels import dev_owner as owner_of

    return owner_of(project / ".dockyard")


def stage(title: str) -> None:
    print(title, file=sys.stderr, flush=True)


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)
