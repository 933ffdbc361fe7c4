"""Container rollouts: moving an app's running instances onto a new version's images.

Cloudflare's semantics (``rollout_step_percentage``, ``rollout_active_grace_period``),
as Dockyard applies them:

- A class's steps are percentages, ascending, ending in 100. A number ``n`` means steps
  of ``n`` % each (25 -> 25, 50, 75, 100); unset means ``[10, 100]``, or ``[100]`` for a
  class of at most one instance. ``immediate`` is one step of 100 %.
- Step ``p`` ends when at least ``ceil(p % of the class's running instances)`` run the
  new image. Counting what runs rather than what was done keeps this right across a
  node restart, a superseded rollout and objects that start (on the new image) or go
  to sleep meanwhile; ``ceil`` makes the first step cover at least one instance.
- The grace period: a step first replaces the instances idle for at least the grace
  period (the longest idle first) and skips the ones active more recently. A skipped
  instance becomes eligible once it has been idle that long, or once the step has
  waited the grace period for it: the grace is the *minimum* wait before an active
  instance may be updated, not a veto, so every rollout finishes. A replaced busy
  instance loses no request: the app process drains it, new requests wait for the new
  container (``ContainerSupervisor.replace``).
- A rollout covers every class of its version: an instance is old when its image is
  not the version's image for its class (a ``none`` deploy leaves old instances, which
  the next rollout moves). Each app has at most one rollout; a new one supersedes the
  old one, which finishes the replacements it has begun and starts no other.

Progress is saved after every instance; ``resume_all`` continues every rollout a
stopped node left running. A replacement that fails is retried with back-off; when it
keeps failing the rollout is marked failed with a message safe to show (never a trace).

Over 400 lines: the step plan (pure, tested alone) and the Rollouts runner share the
records, the step arithmetic and the instance protocols; the plan could move to a module
of its own, and is kept here beside the only code that runs it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ..errors import DockyardError, InvalidArgument
from ..observe.records import LogRecord, LogSink
from .store import NodeStore, RolloutRecord, VersionRecord

__all__ = [
    "STRATEGIES",
    "InstanceControl",
    "RolloutInstance",
    "Rollouts",
    "StepPlan",
    "plan",
    "rollout_summary",
    "steps_from",
]

log = logging.getLogger("dockyard.node.rollout")

STRATEGIES = ("gradual", "immediate", "none")
# Cloudflare's default steps: 10 % first, then the rest.
DEFAULT_STEPS = (10, 100)


class RolloutInstance(Protocol):
    """What a rollout reads of a running instance (``appproc.Instance`` is one)."""

    @property
    def class_name(self) -> str: ...
    @property
    def object_id(self) -> str: ...
    @property
    def image(self) -> str | None: ...  # the full run ref; None: no container
    @property
    def idle_seconds(self) -> float: ...
    @property
    def inflight(self) -> int: ...


class InstanceControl(Protocol):
    """The two calls a rollout makes to an app's process (``AppProcesses`` is one)."""

    async def instances(self, app: str) -> Sequence[RolloutInstance]: ...
    async def replace(self, app: str, class_name: str, object_id: str) -> object: ...


I = TypeVar("I", bound=RolloutInstance)  # noqa: E741


# -- planning (pure) ------------------------------------------------------------------------


def steps_from(value: object, *, max_instances: int | None = None) -> list[int]:
    """A class's steps from ``rollout_step_percentage``: a number ``n`` (steps of ``n`` %),
    an ascending list ending in 100, or None (Cloudflare's default). Raises
    `InvalidArgument` for anything else."""
    if value is None:
        return [100] if max_instances is not None and max_instances < 2 else list(DEFAULT_STEPS)
    if _is_percent(value):
        assert isinstance(value, int)
        return [*range(value, 100, value), 100]
    if (
        isinstance(value, list | tuple)
        and value
        and all(_is_percent(step) for step in value)
        and all(a < b for a, b in itertools.pairwise(value))
        and value[-1] == 100
    ):
        return [int(step) for step in value]
    raise InvalidArgument(
        f"rollout steps must be a percentage from 1 to 100 or an ascending list of "
        f"percentages ending in 100, not {value!r}"
    )


def _is_percent(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 100


@dataclass(frozen=True)
class StepPlan(Generic[I]):
    replace: list[I]  # replace these now
    waiting: int  # how many more this step needs, held back by the grace period
    retry_in: float | None  # seconds until one of those may be replaced; None: none wait


def plan(
    instances: Sequence[I],
    *,
    image: str,
    steps: object,
    step: int,
    grace: float,
    waited: float,
) -> StepPlan[I]:
    """Which of a class's ``instances`` step ``step`` replaces now.

    ``image`` is the new run ref; an instance with another image is old, one with no
    image runs nothing and does not count. ``steps`` as `steps_from` takes them;
    ``waited`` is how long this step has been going (see the module's grace rules).
    """
    percents = steps_from(steps)
    if not 0 <= step < len(percents):
        raise InvalidArgument(f"step {step} is not one of the {len(percents)} steps")
    running = [i for i in instances if i.image is not None]
    old = [i for i in running if i.image != image]
    done = len(running) - len(old)
    need = max(0, math.ceil(percents[step] * len(running) / 100) - done)
    if need == 0:
        return StepPlan([], 0, None)
    # The longest idle first: the least disturbance for the share a step takes.
    by_idle = sorted(old, key=_idle, reverse=True)
    if waited >= grace:
        return StepPlan(by_idle[:need], 0, None)
    eligible = [i for i in by_idle if _idle(i) >= grace]
    chosen = eligible[:need]
    waiting = need - len(chosen)
    if waiting == 0:
        return StepPlan(chosen, 0, None)
    soonest = min(grace - _idle(i) for i in by_idle if _idle(i) < grace)
    return StepPlan(chosen, waiting, max(0.0, min(soonest, grace - waited)))


def _idle(instance: RolloutInstance) -> float:
    return 0.0 if instance.inflight else instance.idle_seconds


def rollout_summary(config: Any) -> dict[str, dict[str, Any]]:
    """``VersionRecord.config["rollout"]`` for a loaded `Config`: each container class's
    resolved steps and grace period, which is all a rollout reads of the config."""
    return {
        container.class_name: {
            "steps": steps_from(
                container.rollout_step_percentage, max_instances=container.max_instances
            ),
            "grace": container.rollout_active_grace_period,
        }
        for container in config.containers
    }


def _class_rollout(version: VersionRecord, class_name: str) -> tuple[list[int], float]:
    summary = (version.config.get("rollout") or {}).get(class_name) or {}
    return steps_from(summary.get("steps")), float(summary.get("grace") or 0)


def _merged_steps(version: VersionRecord, classes: set[str]) -> list[int]:
    """One timeline for classes with different steps: each class takes, at each point,
    its own last step reached (see ``_reached``)."""
    merged = {p for name in classes for p in _class_rollout(version, name)[0]}
    return sorted(merged | {100})


def _reached(steps: list[int], percent: int) -> int | None:
    """The index of the class's last step at or below ``percent`` (None: not started)."""
    reached = [index for index, step in enumerate(steps) if step <= percent]
    return reached[-1] if reached else None


# -- running rollouts -----------------------------------------------------------------------


class _ReplaceFailed(Exception):
    pass


@dataclass(eq=False)
class _Run:
    record: RolloutRecord
    task: asyncio.Task[None] | None = None
    # Start no new replacement (superseded, or the node is stopping).
    stop: bool = False
    # A newer rollout owns the store's record: this one saves nothing more.
    superseded: bool = False
    # Instances replaced that still showed an old image afterwards: how many times.
    repeats: dict[str, int] = dataclasses.field(default_factory=dict)


class Rollouts:
    """Every app's rollout, each run by a background task this object owns.

    ``run_ref`` maps a version's image ("repo@sha256:...") to what instances report
    (the node's ``run_ref``). ``poll_interval`` bounds how long a step waits before it
    looks again at instances held back by the grace period; ``step_pause`` is an
    operator's pause between steps (none by default: a step starts when the one before
    has replaced its share); ``retry_delays`` are the back-off between attempts at a
    failing replacement; ``parallel`` caps replacements under way at once per app.
    """

    def __init__(
        self,
        store: NodeStore,
        processes: InstanceControl,
        *,
        run_ref: Callable[[str], str],
        poll_interval: float = 1.0,
        step_pause: float = 0.0,
        retry_delays: Sequence[float] = (0.5, 2.0, 5.0),
        parallel: int = 4,
        close_timeout: float = 10.0,
        sink: LogSink | None = None,
    ) -> None:
        self._sink = sink  # where each step and the end are recorded (platform events)
        self._store = store
        self._processes = processes
        self._run_ref = run_ref
        self.poll_interval = poll_interval
        self.step_pause = step_pause
        self.retry_delays = tuple(retry_delays)
        self.parallel = parallel
        self.close_timeout = close_timeout
        self._runs: dict[str, _Run] = {}
        # Superseded runs still finishing the replacements they began.
        self._retiring: set[_Run] = set()

    async def start(
        self,
        app: str,
        version: int,
        from_version: int | None,
        strategy: str,
        classes_changed: Sequence[str],
    ) -> RolloutRecord | None:
        """Begin moving ``app``'s instances onto ``version``'s images; returns the new
        rollout (already saved), or None for ``none`` or when no class changed. Running
        instances keep their image under ``none`` until they next start."""
        if strategy not in STRATEGIES:
            raise InvalidArgument(f"rollout must be one of {', '.join(STRATEGIES)}")
        if strategy == "none" or not classes_changed:
            return None
        target = self._store.get_version(app, version)
        if target is None:
            raise DockyardError(f"app {app!r} has no version {version}")
        targets = self._targets(target)
        try:
            old = [i for i in await self._processes.instances(app) if _is_old(i, targets)]
        except Exception as exc:  # the task retries; the count then catches up
            log.warning("Rollout of %s v%s: could not list instances: %s", app, version, exc)
            old = []
        classes = {name for name in classes_changed if name in targets}
        classes |= {i.class_name for i in old}
        now = time.time()
        record = RolloutRecord(
            app=app,
            version=version,
            from_version=from_version,
            state="running",
            steps=[100] if strategy == "immediate" else _merged_steps(target, classes),
            step=0,
            replaced=[],
            total=len(old),
            started_at=now,
            updated_at=now,
            error=None,
        )
        previous = self._runs.pop(app, None)
        if previous is not None:
            # Before the save below: from here on the old run never writes the record.
            previous.stop = previous.superseded = True
            self._retiring.add(previous)
        self._store.save_rollout(record)
        run = _Run(record)
        self._runs[app] = run
        run.task = asyncio.create_task(self._run(run, previous), name=f"rollout {app}")
        return _copy(record)

    async def resume_all(self) -> list[RolloutRecord]:
        """At node start: continue every rollout the last run left running."""
        resumed = []
        for record in self._store.running_rollouts():
            if record.app in self._runs:
                continue
            run = _Run(record)
            self._runs[record.app] = run
            run.task = asyncio.create_task(self._run(run, None), name=f"rollout {record.app}")
            resumed.append(_copy(record))
        return resumed

    def status(self, app: str) -> RolloutRecord | None:
        """The app's latest rollout (running, done or failed), or None if it has none."""
        run = self._runs.get(app)
        return _copy(run.record) if run is not None else self._store.get_rollout(app)

    async def wait(self, app: str) -> RolloutRecord | None:
        """Wait until ``app``'s current rollout ends (done, failed or stopped)."""
        run = self._runs.get(app)
        if run is not None and run.task is not None:
            await asyncio.wait([run.task])
        return self.status(app)

    async def __aenter__(self) -> Rollouts:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def cancel(self, app: str) -> None:
        """Forget ``app``'s rollout (the app is being deleted): it starts no new
        replacement and saves nothing more; the replacements under way finish first."""
        run = self._runs.pop(app, None)
        if run is None:
            return
        run.stop = run.superseded = True
        if run.task is not None:
            _, pending = await asyncio.wait([run.task], timeout=self.close_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def aclose(self) -> None:
        """Node shutdown: start no new replacement, give those under way
        ``close_timeout`` to finish, then cancel. Running rollouts stay running in the
        store, and ``resume_all`` continues them."""
        runs = [*self._runs.values(), *self._retiring]
        for run in runs:
            run.stop = True
        tasks = [run.task for run in runs if run.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.close_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._runs.clear()
        self._retiring.clear()

    # -- one rollout's task -------------------------------------------------------------

    async def _run(self, run: _Run, previous: _Run | None) -> None:
        record = run.record
        try:
            if previous is not None and previous.task is not None:
                # Its replacements under way finish first: one replacement per object.
                await asyncio.wait([previous.task])
            await self._drive(run)
            return
        except _ReplaceFailed as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("Rollout of %s v%s broke", record.app, record.version)
            error = f"the rollout stopped on an internal error: {_public(exc)}"
        finally:
            if run.superseded:
                self._retiring.discard(run)
        try:
            self._finish(run, "failed", error)
        except Exception:  # the store itself may be what broke
            log.exception("Rollout of %s: could not save its failure", record.app)

    async def _drive(self, run: _Run) -> None:
        record = run.record
        version = self._store.get_version(record.app, record.version)
        if version is None:
            raise _ReplaceFailed(f"version {record.version} no longer exists")
        targets = self._targets(version)
        while record.step < len(record.steps):
            percent = record.steps[record.step]
            began = time.monotonic()
            while True:
                if run.stop:
                    return
                instances = await self._attempts(
                    run, "listing the instances", lambda: self._processes.instances(record.app)
                )
                if instances is None:  # stopped while backing off
                    return
                batch, retry_in = self._plan_step(
                    version, targets, instances, percent, time.monotonic() - began
                )
                old = sum(1 for i in instances if _is_old(i, targets))
                total = len(record.replaced) + old
                if total != record.total:
                    record.total = total
                    self._save(run)
                if batch:
                    await self._again(run, batch)
                    await self._replace_batch(run, batch)
                elif retry_in is None:
                    break
                else:
                    await asyncio.sleep(min(self.poll_interval, max(retry_in, 0.01)))
            if run.stop:
                return
            record.step += 1
            self._save(run)
            self._record(
                run,
                "rollout.step",
                f"rollout to version {record.version}: step {record.step} of "
                f"{len(record.steps)} ({percent} %), {len(record.replaced)} of {record.total} "
                "instances replaced",
                step=record.step,
                replaced=len(record.replaced),
                total=record.total,
            )
            if self.step_pause > 0 and record.step < len(record.steps):
                await asyncio.sleep(self.step_pause)
        self._finish(run, "done", None)

    def _plan_step(
        self,
        version: VersionRecord,
        targets: dict[str, str],
        instances: Sequence[RolloutInstance],
        percent: int,
        waited: float,
    ) -> tuple[list[RolloutInstance], float | None]:
        batch: list[RolloutInstance] = []
        retry: list[float] = []
        for class_name, image in targets.items():
            steps, grace = _class_rollout(version, class_name)
            step = _reached(steps, percent)
            if step is None:
                continue
            mine = [i for i in instances if i.class_name == class_name]
            chosen = plan(mine, image=image, steps=steps, step=step, grace=grace, waited=waited)
            batch += chosen.replace
            if chosen.retry_in is not None:
                retry.append(chosen.retry_in)
        return batch, min(retry) if retry else None

    async def _again(self, run: _Run, batch: list[RolloutInstance]) -> None:
        """An instance replaced that still runs an old image (its process could not reach
        the engine, say) is replaced again after a back-off, a few times at most."""
        repeated = [f"{i.class_name}/{i.object_id}" for i in batch]
        repeated = [key for key in repeated if key in run.record.replaced]
        if not repeated:
            return
        for key in repeated:
            run.repeats[key] = run.repeats.get(key, 0) + 1
        worst = max(run.repeats[key] for key in repeated)
        if worst > len(self.retry_delays):
            key = max(repeated, key=lambda k: run.repeats[k])
            raise _ReplaceFailed(f"{key} still runs an old image after {worst} replacements")
        await asyncio.sleep(self.retry_delays[worst - 1])

    async def _replace_batch(self, run: _Run, batch: list[RolloutInstance]) -> None:
        limit = asyncio.Semaphore(max(1, self.parallel))

        async def one(instance: RolloutInstance) -> None:
            async with limit:
                if run.stop:
                    return
                key = f"{instance.class_name}/{instance.object_id}"
                done = await self._attempts(
                    run,
                    f"replacing {key}",
                    lambda: self._processes.replace(
                        run.record.app, instance.class_name, instance.object_id
                    ),
                )
                if done is None:
                    return
                if key not in run.record.replaced:
                    run.record.replaced.append(key)
                self._save(run)

        # Every replacement under way ends before a failure is reported: none is cut off.
        results = await asyncio.gather(*(one(i) for i in batch), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _attempts(self, run: _Run, what: str, call: Callable[[], Any]) -> Any:
        """``call()``, retried after each of ``retry_delays``; None when the run was
        stopped meanwhile. Raises `_ReplaceFailed` once every attempt failed."""
        for attempt, delay in enumerate((*self.retry_delays, None), start=1):
            try:
                result = await call()
            except Exception as exc:
                log.warning(
                    "Rollout of %s v%s: %s failed (attempt %d): %s",
                    run.record.app,
                    run.record.version,
                    what,
                    attempt,
                    exc,
                )
                if delay is None:
                    raise _ReplaceFailed(f"{what} failed {attempt} times: {_public(exc)}") from None
                await asyncio.sleep(delay)
                if run.stop:
                    return None
                continue
            return True if result is None else result
        raise AssertionError("unreachable")

    def in_progress(self) -> int:
        """Rollouts running now (for /metrics)."""
        return sum(1 for run in self._runs.values() if run.record.state == "running")

    def _record(self, run: _Run, event: str, message: str, **fields: object) -> None:
        if self._sink is not None and not run.superseded:
            self._sink.emit(
                LogRecord(
                    app=run.record.app,
                    message=message,
                    source="platform",
                    stream="event",
                    level="error" if fields.get("status") == "failed" else "info",
                    version=run.record.version,
                    event=event,
                    fields={"version": run.record.version, **fields},
                )
            )

    def _finish(self, run: _Run, state: str, error: str | None) -> None:
        run.record.state = state
        run.record.error = error
        self._save(run)
        self._record(
            run,
            "rollout.done",
            f"rollout to version {run.record.version} {state}" + (f": {error}" if error else ""),
            status=state,
        )
        if error is not None:
            log.error("Rollout of %s v%s failed: %s", run.record.app, run.record.version, error)

    def _save(self, run: _Run) -> None:
        if run.superseded:
            return
        run.record.updated_at = time.time()
        self._store.save_rollout(run.record)

    def _targets(self, version: VersionRecord) -> dict[str, str]:
        return {name: self._run_ref(image) for name, image in version.images.items()}


def _is_old(instance: RolloutInstance, targets: dict[str, str]) -> bool:
    target = targets.get(instance.class_name)
    return target is not None and instance.image is not None and instance.image != target


def _public(exc: BaseException) -> str:
    """What a rollout record may say about an error: a Dockyard error's public text,
    else only its type (messages of other errors may carry paths or values)."""
    text = exc.public if isinstance(exc, DockyardError) else type(exc).__name__
    return text[:300]


def _copy(record: RolloutRecord) -> RolloutRecord:
    return dataclasses.replace(record, steps=list(record.steps), replaced=list(record.replaced))
