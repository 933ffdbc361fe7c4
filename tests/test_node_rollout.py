"""Rollouts: the pure step planner, and the orchestration against a real NodeStore with
a small in-memory stand-in for the app processes (the end-to-end test on the real
engine lives in test_platform_e2e.py)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dockyard.errors import InvalidArgument, StartFailed
from dockyard.node.appproc import Instance
from dockyard.node.rollout import Rollouts, plan, rollout_summary, steps_from
from dockyard.node.store import NodeStore

REGISTRY = "127.0.0.1:5000"


def run_ref(image: str) -> str:
    return f"{REGISTRY}/{image}"


def inst(
    class_name: str,
    object_id: str,
    image: str | None,
    *,
    idle_seconds: float = 60.0,
    inflight: int = 0,
) -> Instance:
    return Instance(
        class_name=class_name,
        object_id=object_id,
        name=None,
        phase="healthy" if image else "stopped",
        container_id="c" if image else None,
        image=image,
        idle_seconds=idle_seconds,
        inflight=inflight,
    )


def insts(n: int, image: str | None, cls: str = "Web", **kw: Any) -> list[Instance]:
    return [inst(cls, f"o{k}", image, **kw) for k in range(n)]


# -- plan() -------------------------------------------------------------------------------


def test_steps_from_a_number_a_list_and_the_defaults() -> None:
    assert steps_from(25) == [25, 50, 75, 100]
    assert steps_from(20) == [20, 40, 60, 80, 100]
    assert steps_from(100) == [100]
    assert steps_from([10, 50, 100]) == [10, 50, 100]
    assert steps_from(None) == [10, 100]
    assert steps_from(None, max_instances=20) == [10, 100]
    assert steps_from(None, max_instances=1) == [100]


@pytest.mark.parametrize(
    "steps", [[50, 10, 100], [10, 90], [10, 10, 100], [], 0, 101, True, "25", [10.5, 100]]
)
def test_invalid_steps_are_refused(steps: object) -> None:
    with pytest.raises(InvalidArgument, match="rollout steps must be"):
        steps_from(steps)
    with pytest.raises(InvalidArgument):
        plan(insts(2, "old"), image="new", steps=steps, step=0, grace=0, waited=0)


def test_a_step_index_outside_the_steps_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="step 2"):
        plan(insts(2, "old"), image="new", steps=[50, 100], step=2, grace=0, waited=0)


def test_percent_steps_replace_their_share_of_the_running_instances() -> None:
    fleet = insts(8, "old")
    counts = []
    for step in range(4):
        chosen = plan(fleet, image="new", steps=25, step=step, grace=0, waited=0)
        assert chosen.waiting == 0 and chosen.retry_in is None
        counts.append(len(chosen.replace))
        picked = {i.object_id for i in chosen.replace}
        fleet = [replace(i, image="new") if i.object_id in picked else i for i in fleet]
    assert counts == [2, 2, 2, 2]
    assert all(i.image == "new" for i in fleet)


def test_list_steps_and_instances_already_new_count_as_done() -> None:
    fleet = [*insts(6, "old"), inst("Web", "n0", "new"), inst("Web", "n1", "new")]
    # 10 instances on the new image is the goal of the 50 % step: 5, 2 already there.
    fleet += [inst("Web", "stopped", None), inst("Web", "x", "old")]
    chosen = plan(fleet, image="new", steps=[20, 50, 100], step=1, grace=0, waited=0)
    assert len(chosen.replace) == 3
    assert all(i.image == "old" for i in chosen.replace)
    last = plan(fleet, image="new", steps=[20, 50, 100], step=2, grace=0, waited=0)
    assert len(last.replace) == 7


def test_shares_round_up_so_the_first_step_covers_an_instance() -> None:
    def first(count: int, steps: object) -> int:
        chosen = plan(insts(count, "old"), image="n", steps=steps, step=0, grace=0, waited=0)
        return len(chosen.replace)

    assert first(3, [10, 100]) == 1
    assert first(5, [50, 100]) == 3
    assert first(21, 10) == 3
    assert first(0, [10, 100]) == 0


def test_the_grace_period_skips_active_instances_until_it_passes() -> None:
    fleet = [
        inst("Web", "busy", "old", idle_seconds=0.0, inflight=2),
        inst("Web", "recent", "old", idle_seconds=10.0),
        inst("Web", "quiet", "old", idle_seconds=100.0),
        inst("Web", "quieter", "old", idle_seconds=200.0),
    ]
    # Half of four: the two idle ones (the longest idle first), none held back.
    half = plan(fleet, image="new", steps=[50, 100], step=0, grace=30, waited=0)
    assert [i.object_id for i in half.replace] == ["quieter", "quiet"]
    assert half.waiting == 0 and half.retry_in is None
    # All four: the two active ones wait; "recent" is eligible in 20 s.
    full = plan(fleet, image="new", steps=[50, 100], step=1, grace=30, waited=5)
    assert [i.object_id for i in full.replace] == ["quieter", "quiet"]
    assert full.waiting == 2
    assert full.retry_in == pytest.approx(20.0)
    # The step has waited the whole grace period: everything goes.
    late = plan(fleet, image="new", steps=[50, 100], step=1, grace=30, waited=30)
    assert {i.object_id for i in late.replace} == {"busy", "recent", "quiet", "quieter"}
    assert late.waiting == 0


def test_rollout_summary_resolves_each_class_from_the_config(tmp_path: Path) -> None:
    from dockyard.config import load_config

    (tmp_path / "main.py").write_text(
        "from dockyard import Container\nclass Web(Container):\n    pass\n"
        "class Solo(Container):\n    pass\n"
    )
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "wrangler.jsonc").write_text(
        """{
  "name": "shop", "main": "main.py",
  "containers": [
    {"class_name": "Web", "image": "./Dockerfile", "rollout_step_percentage": 25,
     "rollout_active_grace_period": 30},
    {"class_name": "Solo", "image": "./Dockerfile", "max_instances": 1}
  ],
  "durable_objects": {"bindings": [{"name": "WEB", "class_name": "Web"},
                                   {"name": "SOLO", "class_name": "Solo"}]},
  "migrations": [{"tag": "v1", "new_sqlite_classes": ["Web", "Solo"]}]
}"""
    )
    config = load_config(tmp_path)
    assert rollout_summary(config) == {
        "Web": {"steps": [25, 50, 75, 100], "grace": 30},
        "Solo": {"steps": [100], "grace": 0},
    }


# -- Rollouts -------------------------------------------------------------------------------


class FakeProcesses:
    """The two calls a rollout makes of AppProcesses, over a dict of instances. A
    replacement starts the instance on its class's image as it was when the call began."""

    def __init__(self, fleet: list[Instance], images: dict[str, str], store: NodeStore) -> None:
        self.fleet = {(i.class_name, i.object_id): i for i in fleet}
        self.images = dict(images)  # class -> run ref new starts use
        self.store = store
        self.calls: list[tuple[str, str]] = []
        self.seen: list[dict[str, Any]] = []  # the saved record as each call began
        self.fail: dict[str, list[BaseException]] = {}  # key -> errors to raise, in order
        self.always_fail: dict[str, BaseException] = {}
        self.stuck: set[str] = set()  # replaced, but keep their image
        self.block_at: int | None = None  # the call number that waits for `release`
        self.blocked = asyncio.Event()
        self.release = asyncio.Event()
        self.replaced_count = 0

    async def instances(self, app: str) -> list[Instance]:
        return list(self.fleet.values())

    async def replace(self, app: str, class_name: str, object_id: str) -> None:
        key = f"{class_name}/{object_id}"
        image = self.images[class_name]
        self.calls.append((class_name, object_id))
        record = self.store.get_rollout(app)
        assert record is not None
        self.seen.append(
            {"version": record.version, "step": record.step, "replaced": len(record.replaced)}
        )
        if self.block_at == len(self.calls):
            self.blocked.set()
            await self.release.wait()
        if key in self.always_fail:
            raise self.always_fail[key]
        if self.fail.get(key):
            raise self.fail[key].pop(0)
        if key not in self.stuck:
            old = self.fleet[(class_name, object_id)]
            self.fleet[(class_name, object_id)] = replace(old, image=image, idle_seconds=0.0)
        self.replaced_count += 1

    def images_now(self) -> dict[str, str | None]:
        return {f"{c}/{o}": i.image for (c, o), i in self.fleet.items()}


@pytest.fixture
def store(tmp_path: Path) -> Any:
    store = NodeStore(tmp_path / "node.db")
    yield store
    store.close()


def add_version(
    store: NodeStore, digest: str, *, steps: object = None, grace: float = 0, app: str = "shop"
) -> int:
    store.ensure_app(app)
    rollout = {"Web": {"steps": steps if steps is not None else [10, 100], "grace": grace}}
    version = store.add_version(
        app,
        bundle_hash="b" * 64,
        images={"Web": f"{app}/web@sha256:{digest}"},
        vars={},
        secret_names=[],
        config={"main": "main.py", "classes": ["Web"], "routes": [], "rollout": rollout},
        message="",
        rollout="gradual",
    )
    return version.number


def ref(digest: str) -> str:
    return run_ref(f"shop/web@sha256:{digest}")


def rollouts(store: NodeStore, processes: FakeProcesses, **kw: Any) -> Rollouts:
    kw.setdefault("poll_interval", 0.02)
    kw.setdefault("retry_delays", (0.01, 0.02))
    return Rollouts(store, processes, run_ref=run_ref, **kw)


async def wait_done(ro: Rollouts, app: str = "shop") -> Any:
    record = await asyncio.wait_for(ro.wait(app), 10)
    assert record is not None
    return record


async def test_gradual_steps_run_in_order_each_with_its_share(store: NodeStore) -> None:
    add_version(store, "a")
    v2 = add_version(store, "b", steps=25)
    fake = FakeProcesses(insts(8, ref("a")), {"Web": ref("b")}, store)
    ro = rollouts(store, fake, parallel=1)
    started = await ro.start("shop", v2, 1, "gradual", ["Web"])
    assert started is not None
    assert (started.state, started.steps, started.step, started.total) == (
        "running",
        [25, 50, 75, 100],
        0,
        8,
    )
    record = await wait_done(ro)
    # Two instances a step, each step after the one before; the record saved after
    # every instance (what the store held as each replacement began).
    assert [s["step"] for s in fake.seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s["replaced"] for s in fake.seen] == list(range(8))
    assert (record.state, record.step, record.total, record.error) == ("done", 4, 8, None)
    assert sorted(record.replaced) == sorted(f"Web/o{k}" for k in range(8))
    assert set(fake.images_now().values()) == {ref("b")}
    assert store.get_rollout("shop") == record
    assert len(fake.calls) == 8
    await ro.aclose()


async def test_immediate_is_one_step_and_none_is_no_rollout(store: NodeStore) -> None:
    add_version(store, "a")
    v2 = add_version(store, "b", steps=[10, 100])
    fake = FakeProcesses(insts(5, ref("a")), {"Web": ref("b")}, store)
    ro = rollouts(store, fake)
    assert await ro.start("shop", v2, 1, "none", ["Web"]) is None
    assert await ro.start("shop", v2, 1, "gradual", []) is None
    assert store.get_rollout("shop") is None and fake.calls == []
    started = await ro.start("shop", v2, 1, "immediate", ["Web"])
    assert started is not None and started.steps == [100]
    record = await wait_done(ro)
    assert (record.state, record.step, len(record.replaced)) == ("done", 1, 5)
    assert {s["step"] for s in fake.seen} == {0}
    assert set(fake.images_now().values()) == {ref("b")}
    with pytest.raises(InvalidArgument):
        await ro.start("shop", v2, 1, "sideways", ["Web"])
    await ro.aclose()


async def test_a_rebuilt_rollouts_resumes_and_replaces_only_the_rest(tmp_path: Path) -> None:
    store = NodeStore(tmp_path / "node.db")
    add_version(store, "a")
    v2 = add_version(store, "b", steps=[50, 100])
    fleet = insts(6, ref("a"))
    fake = FakeProcesses(fleet, {"Web": ref("b")}, store)
    fake.block_at = 3
    first = rollouts(store, fake, parallel=1, close_timeout=0)
    await first.start("shop", v2, 1, "gradual", ["Web"])
    await asyncio.wait_for(fake.blocked.wait(), 10)
    # The node stops (its rollout cut off in the middle of the third replacement).
    await first.aclose()
    store.close()

    store = NodeStore(tmp_path / "node.db")
    saved = store.get_rollout("shop")
    assert saved is not None
    assert (saved.state, saved.step, len(saved.replaced)) == ("running", 0, 2)
    assert [r.app for r in store.running_rollouts()] == ["shop"]
    again = FakeProcesses(list(fake.fleet.values()), {"Web": ref("b")}, store)
    second = rollouts(store, again, parallel=1)
    resumed = await second.resume_all()
    assert [r.app for r in resumed] == ["shop"]
    record = await wait_done(second)
    done_before = set(saved.replaced)
    assert {f"{c}/{o}" for c, o in again.calls}.isdisjoint(done_before)
    assert len(again.calls) == 4
    assert (record.state, record.step, len(record.replaced)) == ("done", 2, 6)
    assert set(again.images_now().values()) == {ref("b")}
    assert store.running_rollouts() == []
    await second.aclose()
    store.close()


async def test_a_new_rollout_supersedes_the_running_one(store: NodeStore) -> None:
    add_version(store, "a")
    v2 = add_version(store, "b")
    v3 = add_version(store, "c")
    fake = FakeProcesses(insts(4, ref("a")), {"Web": ref("b")}, store)
    fake.block_at = 2
    ro = rollouts(store, fake, parallel=1)
    await ro.start("shop", v2, 1, "immediate", ["Web"])
    await asyncio.wait_for(fake.blocked.wait(), 10)
    fake.images["Web"] = ref("c")  # the app process now starts v3's image
    newer = await ro.start("shop", v3, v2, "immediate", ["Web"])
    assert newer is not None and newer.version == v3
    status = ro.status("shop")
    assert status is not None and (status.version, status.state) == (v3, "running")
    fake.release.set()
    record = await wait_done(ro)
    # The old rollout finished the replacement it had begun and started no other; the
    # new one replaced everything not on v3's image: the two v2 ones and the two v1 ones.
    assert len(fake.calls) == 2 + 4
    assert fake.replaced_count == 6  # the one under way was let finish, not cut off
    # Once superseded, the old rollout never wrote the store's record again.
    assert [s["version"] for s in fake.seen] == [v2, v2, v3, v3, v3, v3]
    assert (record.version, record.from_version, record.state) == (v3, v2, "done")
    assert len(record.replaced) == 4
    assert set(fake.images_now().values()) == {ref("c")}
    saved = store.get_rollout("shop")
    assert saved is not None and (saved.version, saved.state) == (v3, "done")
    await ro.aclose()


async def test_a_failing_replacement_is_retried_then_fails_the_rollout(store: NodeStore) -> None:
    add_version(store, "a")
    v2 = add_version(store, "b", steps=[100])
    fake = FakeProcesses(insts(3, ref("a")), {"Web": ref("b")}, store)
    fake.always_fail["Web/o1"] = RuntimeError("cannot reach /srv/app with token s3cr3t")
    fake.fail["Web/o2"] = [StartFailed("exit 1"), StartFailed("exit 1")]
    ro = rollouts(store, fake, parallel=1, retry_delays=(0.01, 0.01))
    await ro.start("shop", v2, 1, "gradual", ["Web"])
    record = await wait_done(ro)
    assert record.state == "failed"
    assert record.error == "replacing Web/o1 failed 3 times: RuntimeError"
    assert "s3cr3t" not in str(store.get_rollout("shop"))
    assert fake.calls.count(("Web", "o1")) == 3
    # The one that failed twice succeeded on its third attempt; o0 went through.
    assert sorted(record.replaced) == ["Web/o0", "Web/o2"]
    assert store.get_rollout("shop") == record
    await ro.aclose()


async def test_a_dockyard_error_is_reported_by_its_public_text(store: NodeStore) -> None:
    add_version(store, "a")
    v2 = add_version(store, "b", steps=[100])
    fake = FakeProcesses(insts(1, ref("a")), {"Web": ref("b")}, store)
    fake.always_fail["Web/o0"] = StartFailed("entrypoint /secret/path not found")
    ro = rollouts(store, fake, retry_delays=(0.01,))
    await ro.start("shop", v2, 1, "gradual", ["Web"])
    record = await wait_done(ro)
    assert record.error == "replacing Web/o0 failed 2 times: the container did not start"
    await ro.aclose()


async def test_an_instance_that_stays_old_after_replacement_fails_the_rollout(
    store: NodeStore,
) -> None:
    add_version(store, "a")
    v2 = add_version(store, "b", steps=[100])
    fake = FakeProcesses(insts(2, ref("a")), {"Web": ref("b")}, store)
    fake.stuck.add("Web/o1")
    ro = rollouts(store, fake, retry_delays=(0.01, 0.01))
    await ro.start("shop", v2, 1, "gradual", ["Web"])
    record = await wait_done(ro)
    assert record.state == "failed"
    assert record.error == "Web/o1 still runs an old image after 3 replacements"
    assert fake.calls.count(("Web", "o1")) == 3
    await ro.aclose()


async def test_active_instances_wait_for_the_grace_period(store: NodeStore) -> None:
    add_version(store, "a")
    v2 = add_version(store, "b", steps=[100], grace=0.3)
    fleet = [inst("Web", "busy", ref("a"), idle_seconds=0.0, inflight=1)]
    fleet += insts(2, ref("a"), idle_seconds=50.0)
    fake = FakeProcesses(fleet, {"Web": ref("b")}, store)
    ro = rollouts(store, fake, parallel=1)
    began = time.monotonic()
    await ro.start("shop", v2, 1, "gradual", ["Web"])
    record = await wait_done(ro)
    assert record.state == "done"
    # The idle ones at once; the busy one once the step had waited the grace period.
    assert [o for _, o in fake.calls] == ["o0", "o1", "busy"]
    assert time.monotonic() - began >= 0.3
    await ro.aclose()


async def test_status_reads_the_store_when_nothing_runs(store: NodeStore) -> None:
    add_version(store, "a")
    v2 = add_version(store, "b")
    fake = FakeProcesses([], {"Web": ref("b")}, store)
    ro = rollouts(store, fake)
    assert ro.status("shop") is None
    record = await ro.start("shop", v2, 1, "gradual", ["Web"])
    assert record is not None and record.total == 0
    done = await wait_done(ro)
    assert (done.state, done.replaced) == ("done", [])
    await ro.aclose()
    fresh = rollouts(store, fake)
    assert fresh.status("shop") == done


async def test_cancel_lets_the_replacement_under_way_finish_then_stops(store: NodeStore) -> None:
    add_version(store, "a")
    v2 = add_version(store, "b", steps=[100])
    fake = FakeProcesses(insts(4, ref("a")), {"Web": ref("b")}, store)
    fake.block_at = 2
    ro = rollouts(store, fake, parallel=1)
    await ro.start("shop", v2, 1, "gradual", ["Web"])
    await asyncio.wait_for(fake.blocked.wait(), 10)
    cancelling = asyncio.create_task(ro.cancel("shop"))
    fake.release.set()
    await asyncio.wait_for(cancelling, 10)
    assert (len(fake.calls), fake.replaced_count) == (2, 2)
    saved = store.get_rollout("shop")
    # Nothing saved once cancelled: the record is as the first replacement left it.
    assert saved is not None and (saved.state, len(saved.replaced)) == ("running", 1)
    await ro.aclose()


async def test_classes_with_different_steps_share_one_timeline(store: NodeStore) -> None:
    store.ensure_app("shop")

    def version(digest: str) -> int:
        return store.add_version(
            "shop",
            bundle_hash="b" * 64,
            images={
                "Web": f"shop/web@sha256:{digest}",
                "Api": f"shop/api@sha256:{digest}",
            },
            vars={},
            secret_names=[],
            config={
                "rollout": {
                    "Web": {"steps": [50, 100], "grace": 0},
                    "Api": {"steps": [25, 50, 75, 100], "grace": 0},
                }
            },
            message="",
            rollout="gradual",
        ).number

    version("a")
    v2 = version("b")
    api = run_ref("shop/api@sha256:a")
    fleet = [*insts(4, ref("a")), *insts(4, api, cls="Api")]
    images = {"Web": ref("b"), "Api": run_ref("shop/api@sha256:b")}
    fake = FakeProcesses(fleet, images, store)
    ro = rollouts(store, fake, parallel=1)
    started = await ro.start("shop", v2, 1, "gradual", ["Web", "Api"])
    assert started is not None and started.steps == [25, 50, 75, 100]
    record = await wait_done(ro)
    steps_of = {
        name: [
            seen["step"] for (c, _), seen in zip(fake.calls, fake.seen, strict=True) if c == name
        ]
        for name in ("Web", "Api")
    }
    # Web moves at its own 50 % and 100 %; Api a quarter at each step.
    assert steps_of == {"Web": [1, 1, 3, 3], "Api": [0, 1, 2, 3]}
    assert (record.state, len(record.replaced)) == ("done", 8)
    await ro.aclose()
