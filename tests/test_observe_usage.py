"""UsageMeter: accuracy against the engine's own accounting, restarts, costs, groupings.

The engine tests run real containers (removed by label); the grouping and cost tests
drive the meter with a small fake engine whose times and counters they choose.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dockyard.containers.docker import DockerRuntime
from dockyard.containers.runtime import (
    ContainerEvent,
    ContainerInfo,
    ContainerSpec,
    ContainerStats,
)
from dockyard.errors import EngineUnavailable
from dockyard.observe.records import UsageRow
from dockyard.observe.usage import Prices, UsageMeter
from tests.support.engine import wait_until

IMAGE = "dockyard/busybox:latest"
LITE = {"dockyard.vcpu": "0.0625", "dockyard.memory_mib": "256", "dockyard.disk_mb": "2000"}


def burn(ticks: int, then: str = "") -> str:
    """Shell that burns CPU in its own process until it used `ticks` (10 ms) of CPU,
    then prints "burned" (builtins only: no child process takes the time)."""
    return (
        "while :; do i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; "
        "read -r line < /proc/self/stat; set -- $line; "
        f"[ $(( ${{14}} + ${{15}} )) -ge {ticks} ] && break; done; echo burned; {then}"
    )


def steps(seconds: float) -> float:
    return math.ceil(round(seconds * 1e6) / 10_000) / 100


def engine_seconds(info: ContainerInfo) -> float:
    assert info.started_at is not None and info.finished_at is not None
    return (info.finished_at - info.started_at) / timedelta(microseconds=1) / 1e6


def only(rows: list[UsageRow]) -> UsageRow:
    assert len(rows) == 1, rows
    return rows[0]


async def run(runtime: DockerRuntime, labels: Mapping[str, str], script: str) -> str:
    info = await runtime.run(
        ContainerSpec(image=IMAGE, labels={**labels, **LITE}, entrypoint=["sh", "-c", script])
    )
    return info.id


async def printed(runtime: DockerRuntime, container_id: str, text: str) -> bool:
    return any([text in line async for line in runtime.logs(container_id)])


@pytest.mark.docker
async def test_stats_reads_running_containers_only(
    docker_runtime: DockerRuntime, test_labels: dict[str, str]
) -> None:
    cid = await run(docker_runtime, test_labels, "exec sleep 3600")
    running = await docker_runtime.stats(cid)
    assert running is not None
    assert running.cpu_ns > 0 and running.memory_bytes > 0
    assert running.rx_bytes >= 0 and running.tx_bytes >= 0
    assert abs(running.time - time.time()) < 5
    await docker_runtime.pause(cid)
    assert await docker_runtime.stats(cid) is not None  # frozen, still there
    await docker_runtime.unpause(cid)
    await docker_runtime.kill(cid)
    await docker_runtime.wait(cid)
    assert await docker_runtime.stats(cid) is None
    await docker_runtime.remove(cid)
    assert await docker_runtime.stats(cid) is None


@pytest.mark.docker
@pytest.mark.slow
async def test_one_cpu_for_two_seconds_is_two_vcpu_seconds(
    tmp_path: Path, docker_runtime: DockerRuntime, test_labels: dict[str, str]
) -> None:
    async with UsageMeter(
        tmp_path / "usage.db", docker_runtime, test_labels, interval=0.5
    ) as meter:
        cid = await run(docker_runtime, test_labels, burn(200, "exec sleep 3600"))
        meter.on_event(ContainerEvent("start", cid, {**test_labels, **LITE}, time.time()))
        await wait_until(lambda: printed(docker_runtime, cid, "burned"), within=60)
        await meter.read_now(cid)
        engine = await docker_runtime.stats(cid)
        assert engine is not None
        metered = only(meter.usage(app=test_labels["dockyard.app"]))
        # Idle afterwards: a later reading adds (almost) nothing.
        await wait_until(lambda: _samples_after(meter, cid, engine.time), within=10)
        later = only(meter.usage(app=test_labels["dockyard.app"]))
        samples = meter.samples(cid)
    assert metered.vcpu_seconds == pytest.approx(2.0, rel=0.05)
    # The engine's own cgroup accounting, in 10 ms steps.
    assert metered.vcpu_seconds == pytest.approx(engine.cpu_ns / 1e9, abs=0.01)
    assert later.vcpu_seconds - metered.vcpu_seconds <= 0.02
    # Charts: the burn shows (the machine is shared, so not as a whole CPU), then idles.
    assert max(fraction for _, fraction, _ in samples) > 0.1
    assert samples[-1][1] < 0.05 and samples[-1][2] > 0
    print(f"metered {metered.vcpu_seconds} vCPU-s; engine {engine.cpu_ns / 1e9:.4f} s")


async def _samples_after(meter: UsageMeter, cid: str, moment: float) -> bool:
    return any(at > moment for at, _, _ in meter.samples(cid))


@pytest.mark.docker
@pytest.mark.slow
async def test_lite_container_for_ten_seconds_is_two_and_a_half_gib_seconds(
    tmp_path: Path, docker_runtime: DockerRuntime, test_labels: dict[str, str]
) -> None:
    async with UsageMeter(tmp_path / "usage.db", docker_runtime, test_labels) as meter:
        cid = await run(docker_runtime, test_labels, "exec sleep 10")
        meter.on_event(ContainerEvent("start", cid, {**test_labels, **LITE}, time.time()))
        await docker_runtime.wait(cid)
        meter.on_event(ContainerEvent("die", cid, {**test_labels, **LITE}, time.time(), 0))
        await wait_until(lambda: _ended(meter, cid))
        row = only(meter.usage(app=test_labels["dockyard.app"]))
    info = await docker_runtime.inspect(cid)
    assert info is not None
    assert row.memory_gib_seconds == pytest.approx(2.5, rel=0.01)
    assert row.running_seconds == steps(engine_seconds(info))
    assert row.memory_gib_seconds == pytest.approx(row.running_seconds * 0.25)
    assert row.disk_gb_seconds == pytest.approx(row.running_seconds * 2.0)
    print(f"metered {row.memory_gib_seconds} GiB-s over {row.running_seconds} s")


async def _ended(meter: UsageMeter, cid: str) -> bool:
    return all(item["container_id"] != cid for item in meter.live())


@pytest.mark.docker
@pytest.mark.slow
async def test_a_restarted_meter_neither_loses_nor_doubles_a_run(
    tmp_path: Path, docker_runtime: DockerRuntime, test_labels: dict[str, str]
) -> None:
    path = tmp_path / "usage.db"
    app = test_labels["dockyard.app"]
    keeps = await run(docker_runtime, {**test_labels, "dockyard.class": "keeps"}, "exec sleep 3600")
    dies = await run(docker_runtime, {**test_labels, "dockyard.class": "dies"}, "exec sleep 3600")
    async with UsageMeter(path, docker_runtime, test_labels, interval=60) as first:
        await docker_runtime.exec(keeps, ["sh", "-c", burn(30)])
        await first.read_now(keeps)
        before = {row.key: row for row in first.usage(app=app, by="class")}
    # burn() counts its CPU in scheduler ticks, sampled; the meter reads the cgroup's
    # nanoseconds, which came out 0.01 s under 30 ticks once in CI: allow 0.05 s.
    assert before["keeps"].vcpu_seconds >= 0.3 - 0.05
    # While no meter runs: more CPU, and one container ends.
    await docker_runtime.exec(keeps, ["sh", "-c", burn(30)])
    await docker_runtime.kill(dies)
    await docker_runtime.wait(dies)
    async with UsageMeter(path, docker_runtime, test_labels, interval=60) as second:
        await second.read_now(keeps)
        engine = await docker_runtime.stats(keeps)
        await docker_runtime.kill(keeps)
        await docker_runtime.wait(keeps)
        await second.read_now(keeps)
        after = {row.key: row for row in second.usage(app=app, by="class")}
    assert engine is not None
    for cid, name in ((keeps, "keeps"), (dies, "dies")):
        info = await docker_runtime.inspect(cid)
        assert info is not None
        assert after[name].runs == 1
        assert after[name].running_seconds == steps(engine_seconds(info))
    assert after["keeps"].vcpu_seconds == pytest.approx(engine.cpu_ns / 1e9, abs=0.01)
    # The run while no meter ran is counted (see the allowance above).
    assert after["keeps"].vcpu_seconds >= before["keeps"].vcpu_seconds + 0.3 - 0.05


@pytest.mark.docker
async def test_paused_time_is_reported_apart_and_not_billed(
    tmp_path: Path, docker_runtime: DockerRuntime, test_labels: dict[str, str]
) -> None:
    labels = {**test_labels, **LITE}
    async with UsageMeter(tmp_path / "usage.db", docker_runtime, test_labels) as meter:
        cid = await run(docker_runtime, test_labels, "exec sleep 3600")
        await meter.read_now(cid)
        await docker_runtime.pause(cid)
        paused_at = time.time()
        meter.on_event(ContainerEvent("pause", cid, labels, paused_at))
        await wait_until(lambda: _paused(meter, cid, True))
        await docker_runtime.unpause(cid)
        unpaused_at = time.time()
        meter.on_event(ContainerEvent("unpause", cid, labels, unpaused_at))
        await wait_until(lambda: _paused(meter, cid, False))
        await docker_runtime.kill(cid)
        await docker_runtime.wait(cid)
        await meter.read_now(cid)
        row = only(meter.usage(app=test_labels["dockyard.app"]))
    info = await docker_runtime.inspect(cid)
    assert info is not None
    assert row.paused_seconds == pytest.approx(unpaused_at - paused_at, abs=0.011)
    assert row.running_seconds == pytest.approx(engine_seconds(info) - row.paused_seconds, abs=0.02)
    assert row.memory_gib_seconds == pytest.approx(row.running_seconds * 0.25)


async def _paused(meter: UsageMeter, cid: str, paused: bool) -> bool:
    return any(item["container_id"] == cid and item["paused"] == paused for item in meter.live())


# Groupings, steps and costs, on a fake engine with chosen times and counters.


class FakeEngine:
    """Just what the meter asks: list, inspect, stats."""

    def __init__(self) -> None:
        self.infos: dict[str, ContainerInfo] = {}
        self.counters: dict[str, ContainerStats] = {}

    def start(self, cid: str, labels: Mapping[str, str], at: datetime) -> None:
        self.infos[cid] = ContainerInfo(
            cid, cid, IMAGE, {"dockyard.owner": "fake", **labels}, "running", True, None,
            False, {}, at, None,
        )  # fmt: skip

    def read(self, cid: str, at: datetime, cpu_seconds: float, tx_bytes: int = 0) -> None:
        self.counters[cid] = ContainerStats(
            at.timestamp(), round(cpu_seconds * 1e9), 1, 0, tx_bytes
        )

    def finish(self, cid: str, at: datetime) -> None:
        info = self.infos[cid]
        self.infos[cid] = ContainerInfo(
            cid, cid, IMAGE, info.labels, "exited", False, 0, False, {}, info.started_at, at
        )

    down = False
    calls_while_down = 0

    def answer(self) -> None:
        if self.down:
            self.calls_while_down += 1
            raise EngineUnavailable("engine down (test)")

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        self.answer()
        return [i for i in self.infos.values() if labels.items() <= i.labels.items()]

    async def inspect(self, cid: str) -> ContainerInfo | None:
        self.answer()
        return self.infos.get(cid)

    async def stats(self, cid: str) -> ContainerStats | None:
        self.answer()
        info = self.infos.get(cid)
        return self.counters.get(cid) if info is not None and info.running else None


T0 = datetime(2026, 3, 10, 23, 0, tzinfo=UTC)


async def metered(
    meter: UsageMeter, engine: FakeEngine, cid: str, labels: dict[str, str], start: datetime,
    seconds: float, cpu: float = 0.0, tx: int = 0,
) -> None:  # fmt: skip
    end = start + timedelta(seconds=seconds)
    engine.start(cid, labels, start)
    await meter.read_now(cid)
    engine.read(cid, end, cpu, tx)
    await meter.read_now(cid)
    engine.finish(cid, end)
    await meter.read_now(cid)


def lite(app: str, cls: str, obj: str) -> dict[str, str]:
    return {"dockyard.app": app, "dockyard.class": cls, "dockyard.object_id": obj, **LITE}


async def fake_meter(
    tmp_path: Path, prices: Prices = Prices(), interval: float = 5.0
) -> tuple[UsageMeter, FakeEngine]:
    engine = FakeEngine()
    owner = {"dockyard.owner": "fake"}
    meter = UsageMeter(tmp_path / "usage.db", engine, owner, prices=prices, interval=interval)  # type: ignore[arg-type]
    await meter.start()
    return meter, engine


async def test_usage_groups_by_app_class_and_object(tmp_path: Path) -> None:
    meter, engine = await fake_meter(tmp_path)
    await metered(meter, engine, "a1", lite("shop", "Cart", "o1"), T0, 100, cpu=3)
    await metered(meter, engine, "a2", lite("shop", "Cart", "o2"), T0, 50, cpu=1)
    await metered(meter, engine, "a3", lite("shop", "Search", "o3"), T0, 10.001, tx=2_000_000)
    await metered(meter, engine, "b1", lite("blog", "Render", "o4"), T0, 20)
    window: dict[str, Any] = {"since": T0.timestamp(), "until": T0.timestamp() + 3600}
    apps = {row.key: row for row in meter.usage(**window)}
    assert set(apps) == {"shop", "blog"}
    assert (apps["shop"].runs, apps["shop"].running_seconds) == (3, 160.01)
    assert apps["shop"].vcpu_seconds == 4.0
    assert apps["shop"].egress_bytes == 2_000_000
    assert apps["blog"].memory_gib_seconds == pytest.approx(20 * 0.25)
    classes = {row.key: row for row in meter.usage(app="shop", by="class", **window)}
    assert {k: (r.runs, r.running_seconds) for k, r in classes.items()} == {
        "Cart": (2, 150.0),
        "Search": (1, 10.01),  # 10.001 s is metered as 10.01 s (10 ms steps, rounded up)
    }
    objects = meter.usage(app="shop", by="object", **window)
    assert [(r.key, r.vcpu_seconds) for r in objects] == [("o1", 3.0), ("o2", 1.0), ("o3", 0.0)]
    await meter.aclose()


async def test_usage_by_day_splits_a_run_at_midnight_and_clips_the_window(tmp_path: Path) -> None:
    meter, engine = await fake_meter(tmp_path)
    await metered(meter, engine, "c1", lite("shop", "Cart", "o1"), T0, 7200, cpu=10)
    days = meter.usage(by="day", since=T0.timestamp() - 86400, until=T0.timestamp() + 86400)
    assert [(r.key, r.running_seconds, r.vcpu_seconds, r.runs) for r in days] == [
        ("2026-03-10", 3600.0, 5.0, 1),
        ("2026-03-11", 3600.0, 5.0, 1),
    ]
    half = only(meter.usage(since=T0.timestamp() + 1800, until=T0.timestamp() + 2700))
    assert (half.running_seconds, half.vcpu_seconds) == (900.0, 1.25)
    assert meter.usage(since=T0.timestamp() + 7200) == []
    with pytest.raises(ValueError, match="use app, class, object or day"):
        meter.usage(by="region")
    await meter.aclose()


async def test_costs_are_at_the_prices(tmp_path: Path) -> None:
    prices = Prices(egress_gb=0.05)
    meter, engine = await fake_meter(tmp_path, prices)
    await metered(meter, engine, "d1", lite("shop", "Cart", "o1"), T0, 1000, cpu=40, tx=3 * 10**9)
    row = only(meter.usage(since=T0.timestamp()))
    assert (row.memory_gib_seconds, row.vcpu_seconds, row.disk_gb_seconds) == (250.0, 40.0, 2000.0)
    assert row.cost_usd == pytest.approx(
        250 * 0.0000025 + 40 * 0.000020 + 2000 * 0.00000007 + 3 * 0.05
    )
    await meter.aclose()


async def test_monthly_allowances_are_used_up_first(tmp_path: Path) -> None:
    prices = Prices(included_vcpu_seconds=30, included_memory_gib_seconds=1000)
    meter, engine = await fake_meter(tmp_path, prices)
    await metered(
        meter, engine, "e1", lite("shop", "Cart", "o1"), T0 - timedelta(days=1), 10, cpu=20
    )
    await metered(meter, engine, "e2", lite("blog", "Cart", "o2"), T0, 10, cpu=20)
    # Next month starts with the whole allowance again.
    next_month = T0 + timedelta(days=30)
    await metered(meter, engine, "e3", lite("blog", "Cart", "o3"), next_month, 10, cpu=20)
    blog = {r.key: r.cost_usd for r in meter.usage(app="blog", by="day")}
    disk = 10 * 2.0 * 0.00000007
    assert blog["2026-03-10"] == pytest.approx(10 * 0.000020 + disk)  # 10 of its 20 s were free
    assert blog["2026-04-09"] == pytest.approx(disk)
    await meter.aclose()


@pytest.mark.docker
@pytest.mark.slow
async def test_engine_events_alone_meter_a_run_with_a_pause(
    tmp_path: Path, docker_runtime: DockerRuntime, test_labels: dict[str, str]
) -> None:
    """Wired as the node does: the engine's event stream into `on_event`, no read_now."""
    async with UsageMeter(tmp_path / "usage.db", docker_runtime, test_labels) as meter:
        since = time.time()

        async def pump() -> None:
            async for event in docker_runtime.events(test_labels, since=since):
                meter.on_event(event)

        task = asyncio.create_task(pump())
        try:
            cid = await run(docker_runtime, test_labels, "exec sleep 3600")
            await wait_until(lambda: _paused(meter, cid, False))
            await docker_runtime.pause(cid)
            await wait_until(lambda: _paused(meter, cid, True))
            await docker_runtime.unpause(cid)
            await wait_until(lambda: _paused(meter, cid, False))
            await docker_runtime.kill(cid)
            await wait_until(lambda: _ended(meter, cid))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        row = only(meter.usage(app=test_labels["dockyard.app"]))
    info = await docker_runtime.inspect(cid)
    assert info is not None
    assert row.runs == 1
    assert 0 < row.paused_seconds < engine_seconds(info)
    assert row.running_seconds + row.paused_seconds == pytest.approx(engine_seconds(info), abs=0.02)


async def test_an_engine_outage_is_caught_up_once_the_engine_is_back(tmp_path: Path) -> None:
    meter, engine = await fake_meter(tmp_path, interval=0.02)
    start = datetime.now(UTC) - timedelta(seconds=100)
    for cid in ("ends", "removed"):
        engine.start(cid, lite("shop", cid, cid), start)
        engine.read(cid, start + timedelta(seconds=50), cpu_seconds=5)
        await meter.read_now(cid)
    engine.down = True

    async def ticked_while_down() -> bool:
        return engine.calls_while_down >= 40  # past a reconciliation (every 12 ticks)

    await wait_until(ticked_while_down)
    # While the engine was away: one container ended, the other was removed.
    engine.finish("ends", start + timedelta(seconds=90))
    del engine.infos["removed"]
    engine.down = False

    async def both_ended() -> bool:
        return meter.live() == []

    await wait_until(both_ended)
    rows = {row.key: row for row in meter.usage(app="shop", by="class")}
    await meter.aclose()
    assert (rows["ends"].running_seconds, rows["ends"].vcpu_seconds) == (90.0, 5.0)
    # Removed unseen: it ran at least until its last reading, and that is what is billed.
    assert (rows["removed"].running_seconds, rows["removed"].vcpu_seconds) == (50.0, 5.0)
