from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from dockyard.objects import AlarmInfo, DurableObject, ObjectHost
from dockyard.objects.alarms import retry_delay
from dockyard.observe.records import LogRecord
from tests.support.objects_helpers import wait_for


class Alarmed(DurableObject):
    runs: ClassVar[list[tuple[str | None, AlarmInfo]]] = []
    failures_left: ClassVar[dict[str | None, int]] = {}

    async def schedule(self, when: Any) -> None:
        await self.ctx.storage.set_alarm(when)

    async def current(self) -> float | None:
        return await self.ctx.storage.get_alarm()

    async def cancel(self) -> None:
        await self.ctx.storage.delete_alarm()

    async def fired(self) -> int:
        return await self.ctx.storage.get("fired") or 0

    async def alarm(self, info: AlarmInfo) -> None:
        name = self.ctx.id.name
        Alarmed.runs.append((name, info))
        assert await self.ctx.storage.get_alarm() is None  # the running alarm is not pending
        if Alarmed.failures_left.get(name, 0):
            Alarmed.failures_left[name] -= 1
            raise RuntimeError(f"alarm of {name} failed")
        await self.ctx.storage.put("fired", await self.fired() + 1)
        if name == "recurring" and await self.fired() < 3:
            await self.ctx.storage.set_alarm(time.time() * 1000 + 10)


@pytest.fixture(autouse=True)
def _reset() -> None:
    Alarmed.runs = []
    Alarmed.failures_left = {}


def ms(seconds_from_now: float) -> float:
    return (time.time() + seconds_from_now) * 1000


def test_retry_delays_double_from_two_seconds() -> None:
    assert [retry_delay(n) for n in range(1, 7)] == [2, 4, 8, 16, 32, 64]


async def test_alarm_fires_once_and_is_cleared(tmp_path: Path) -> None:
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Alarmed", Alarmed)
        ns = host.namespace("Alarmed")
        past, soon, later = ns.get_by_name("past"), ns.get_by_name("soon"), ns.get_by_name("x")
        await later.schedule(ms(3600))
        await soon.schedule(ms(0.1))
        await past.schedule(0)
        await wait_for(lambda: len(Alarmed.runs) == 2)
        assert [name for name, _ in Alarmed.runs] == ["past", "soon"]
        assert Alarmed.runs[0][1] == AlarmInfo(is_retry=False, retry_count=0)
        assert await past.fired() == 1 and await past.current() is None
        assert await later.current() == pytest.approx(ms(3600), abs=5000)
        await later.cancel()
        assert host.statistics().pending_alarms == 0
        assert (tmp_path / "objects" / "Alarmed" / "_alarms.sqlite").exists()


async def test_alarm_can_reschedule_itself(tmp_path: Path) -> None:
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Alarmed", Alarmed)
        stub = host.namespace("Alarmed").get_by_name("recurring")
        await stub.schedule(0)
        await wait_for(lambda: len(Alarmed.runs) == 3)
        assert await stub.fired() == 3 and await stub.current() is None


async def test_failing_alarm_is_retried_with_backoff_then_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with ObjectHost(tmp_path, app="t") as host:
        host.alarms.retry_base = 0.01  # 10, 20, 40, ... ms instead of 2, 4, 8, ... s
        host.set_class("Alarmed", Alarmed)
        ns = host.namespace("Alarmed")
        Alarmed.failures_left = {"flaky": 2, "broken": 100}
        await ns.get_by_name("flaky").schedule(0)
        await ns.get_by_name("broken").schedule(0)
        await wait_for(lambda: host.statistics().pending_alarms == 0, within=10)
        flaky = [info for name, info in Alarmed.runs if name == "flaky"]
        broken = [info for name, info in Alarmed.runs if name == "broken"]
        assert [i.retry_count for i in flaky] == [0, 1, 2]
        assert [i.is_retry for i in flaky] == [False, True, True]
        assert await ns.get_by_name("flaky").fired() == 1
        assert [i.retry_count for i in broken] == [0, 1, 2, 3, 4, 5, 6]
        dropped = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(dropped) == 1 and "failed 7 times, dropping it" in dropped[0].getMessage()


async def test_failed_alarm_runs_are_platform_events(tmp_path: Path) -> None:
    events: list[LogRecord] = []

    class Sink:
        def emit(self, record: LogRecord) -> None:
            events.append(record)

    async with ObjectHost(tmp_path, app="t") as host:
        host.alarms.retry_base = 0.01
        host.alarms.app, host.alarms.sink = "t", Sink()
        host.set_class("Alarmed", Alarmed)
        Alarmed.failures_left = {"flaky": 2}
        await host.namespace("Alarmed").get_by_name("flaky").schedule(0)
        await wait_for(lambda: host.statistics().pending_alarms == 0, within=10)
    assert [(e.event, e.fields["attempt"], e.fields["dropped"]) for e in events] == [
        ("alarm.retry", 1, False),
        ("alarm.retry", 2, False),
    ]
    assert {(e.app, e.class_name, e.object_name, e.level) for e in events} == {
        ("t", "Alarmed", "flaky", "warning")
    }


async def test_alarms_wait_for_their_class(tmp_path: Path) -> None:
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Alarmed", Alarmed)
        await host.namespace("Alarmed").get_by_name("a").schedule(0)
    async with ObjectHost(tmp_path, app="t") as host:
        # the due alarm is parked (not fired) while its class is unbound
        await wait_for(lambda: bool(host.alarms._parked.get("Alarmed")))
        assert Alarmed.runs == []
        host.set_class("Alarmed", Alarmed)
        await wait_for(lambda: len(Alarmed.runs) == 1)


async def test_restart_keeps_storage_and_fires_alarm_missed_during_downtime(
    tmp_path: Path,
) -> None:
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Alarmed", Alarmed)
        stub = host.namespace("Alarmed").get_by_name("r")
        due = ms(0.3)
        await stub.schedule(due)
    assert Alarmed.runs == []
    # downtime: wait until the alarm time has passed while no host runs
    await wait_for(lambda: time.time() * 1000 > due + 50)
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Alarmed", Alarmed)
        stub = host.namespace("Alarmed").get_by_name("r")
        await wait_for(lambda: host.statistics().pending_alarms == 0)
        assert await stub.fired() == 1
        assert [name for name, _ in Alarmed.runs] == ["r"]  # ctx.id.name came from the index
    async with ObjectHost(tmp_path, app="t") as host:
        host.set_class("Alarmed", Alarmed)
        assert host.statistics().pending_alarms == 0
        assert await host.namespace("Alarmed").get_by_name("r").fired() == 1
