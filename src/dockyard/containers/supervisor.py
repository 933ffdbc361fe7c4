"""``ContainerSupervisor``: the node's owner of one object's container.

The user's ``Container`` subclass is a thin facade; everything that keeps a container
right lives here, owned by the node rather than by an instance of user code:

- one explicit ``Phase``, changed only through ``_enter`` (the allowed transitions are
  the ``TRANSITIONS`` table below);
- the start task, shared by every caller and shielded from their cancellation (a
  caller that gives up never fails the start for the others);
- the in-flight count, kept by ``Lease`` objects that are released exactly once
  whatever ends a request (an answer, an error, a cancellation, a client that left);
- the sleep timer, the exit monitor and the engine handle (the container's id and
  host ports);
- the tasks it starts (exit monitor, WebSocket bridges, hook calls), cancelled and
  awaited by ``aclose``.

A worker reload replaces the facade instance, never the supervisor: the next instance
attaches to the same supervisor, so an object never has two containers. Hooks
(``on_start``, ``on_stop``, ``on_error``, ``on_activity_expired``) are called on
whichever instance is attached, and the instance is brought back (``wake``) when a hook
is due and none is.

This module is longer than most (over 400 lines) on purpose: it is one state machine,
and every transition, task and timer of it is kept in one place to be read together.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..errors import (
    ContainerError,
    ContainerGone,
    EngineUnavailable,
    ImageError,
    NoCapacity,
    StartFailed,
    TooManyStarts,
)
from ..http import Request, Response
from .egress_proxy import EgressProxy
from .outbound import EgressRules, Handler, call_handler, proxy_env
from .readiness import Readiness, wait_for_port
from .runtime import ContainerInfo, EgressListeners, ExitStatus
from .state import State, Status, StopParams, StopReason
from .upstream import InNamespace, Target

if TYPE_CHECKING:
    from .manager import ContainerManager

__all__ = ["ContainerOptions", "ContainerSupervisor", "Lease", "Phase"]

log = logging.getLogger("dockyard.containers")


class Phase(enum.Enum):
    STOPPED = "stopped"  # no container
    STARTING = "starting"  # the engine is creating and starting it
    RUNNING = "running"  # started; its ports are not verified yet
    HEALTHY = "healthy"  # its ports answered
    PAUSED = "paused"  # frozen (sleep_mode = "pause")
    STOPPING = "stopping"  # signalled; waiting for it to exit
    UNKNOWN = "unknown"  # the engine does not answer: it may still run


# The only ways the phase may change. A container found running at start-up (adopted)
# enters RUNNING, HEALTHY or PAUSED straight from STOPPED.
TRANSITIONS: Mapping[Phase, frozenset[Phase]] = {
    Phase.STOPPED: frozenset({Phase.STARTING, Phase.HEALTHY, Phase.PAUSED}),
    Phase.STARTING: frozenset({Phase.RUNNING, Phase.HEALTHY, Phase.PAUSED, Phase.STOPPED}),
    Phase.RUNNING: frozenset(
        {Phase.HEALTHY, Phase.PAUSED, Phase.STOPPING, Phase.STOPPED, Phase.UNKNOWN}
    ),
    Phase.HEALTHY: frozenset({Phase.PAUSED, Phase.STOPPING, Phase.STOPPED, Phase.UNKNOWN}),
    Phase.PAUSED: frozenset({Phase.STARTING, Phase.STOPPING, Phase.STOPPED, Phase.UNKNOWN}),
    Phase.STOPPING: frozenset({Phase.STOPPED, Phase.UNKNOWN}),
    Phase.UNKNOWN: frozenset({Phase.RUNNING, Phase.HEALTHY, Phase.PAUSED, Phase.STOPPED}),
}

_LIVE = frozenset({Phase.RUNNING, Phase.HEALTHY, Phase.PAUSED, Phase.STOPPING, Phase.UNKNOWN})


@dataclass(frozen=True, slots=True)
class ContainerOptions:
    """What a Container class says about its container, read once per class."""

    class_name: str
    default_port: int | None
    required_ports: tuple[int, ...]
    sleep_after: float
    sleep_mode: Literal["stop", "pause"]
    stop_paused_after: float
    env_vars: Mapping[str, str]
    entrypoint: tuple[str, ...] | None
    enable_internet: bool
    readiness: Readiness
    start_timeout: float
    stop_timeout: float
    start_boost: bool
    # Hardening a class may loosen (see ContainerSpec): capabilities it needs back,
    # its own process limit, a read-only root.
    cap_add: tuple[str, ...] = ()
    pids_limit: int | None = None
    read_only_root: bool = False
    # The class's own engine labels (never a "dockyard." one: the manager refuses those).
    labels: tuple[tuple[str, str], ...] = ()
    # Egress control (outbound.py): the class's rules with its stored runtime changes.
    egress: EgressRules = field(default_factory=EgressRules)

    @property
    def ports_to_check(self) -> list[int]:
        if self.required_ports:
            return list(self.required_ports)
        return [self.default_port] if self.default_port is not None else []

    @property
    def declared_ports(self) -> list[int]:
        default = [self.default_port] if self.default_port is not None else []
        return sorted({*self.required_ports, *default})


@dataclass(frozen=True, slots=True)
class StartOverrides:
    env_vars: Mapping[str, str] | None = None
    entrypoint: Sequence[str] | None = None
    enable_internet: bool | None = None
    labels: Mapping[str, str] | None = None


class Hooks(Protocol):
    """What the attached facade instance offers the supervisor (the user's overrides)."""

    async def on_start(self) -> None: ...

    async def on_stop(self, params: StopParams) -> None: ...

    async def on_error(self, error: BaseException) -> None: ...

    async def on_activity_expired(self) -> None: ...


class Lease:
    """One request's hold on the container: released once, whatever ends the request."""

    __slots__ = ("_supervisor",)

    def __init__(self, supervisor: ContainerSupervisor) -> None:
        self._supervisor: ContainerSupervisor | None = supervisor

    def release(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor._lease_released()


class ContainerSupervisor:
    def __init__(
        self,
        manager: ContainerManager,
        class_name: str,
        object_id: str,
        object_name: str | None,
    ) -> None:
        self.manager = manager
        self.class_name = class_name
        self.object_id = object_id
        self.object_name = object_name
        self.phase = Phase.STOPPED
        self.info: ContainerInfo | None = None
        self.options: ContainerOptions | None = None
        self.last_output: list[str] = []
        self._state = State.at("stopped", time.time())
        self._restored = False
        self._hooks: Hooks | None = None
        self._persist: Callable[[dict[str, Any]], None] | None = None
        self._inflight = 0
        self._deadline = 0.0
        self.last_active = asyncio.get_running_loop().time()
        self._timer: asyncio.TimerHandle | None = None
        # Deadlines are in the loop's clock, so timers and checks agree.
        self._loop = asyncio.get_running_loop()
        self._start_task: asyncio.Task[None] | None = None
        self._probes: dict[int, asyncio.Task[None]] = {}
        self._ready_ports: set[int] = set()
        # The ports' targets (see target()), for the container run in ``info``.
        self._targets: tuple[ContainerInfo, dict[int, Target]] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stop_reason: StopReason | None = None
        self._boosted = False
        self._stopped = asyncio.Event()
        self._stopped.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        # Set except while a rollout replaces the container: requests wait at the gate.
        self._gate = asyncio.Event()
        self._gate.set()
        self._gated = 0
        self._drained = asyncio.Event()
        # What the egress proxy applies, read per request (setters change it live).
        self.egress_rules = EgressRules()
        self._egress_proxy: EgressProxy | None = None

    def __repr__(self) -> str:
        return f"container {self.class_name}({self.object_name or self.object_id[:12]})"

    # -- the facade -------------------------------------------------------------------------

    def attach(
        self,
        hooks: Hooks,
        options: ContainerOptions,
        persist: Callable[[dict[str, Any]], None],
        stored: Mapping[str, Any] | None,
    ) -> None:
        """A (new) instance of the object takes over hooks and the stored state."""
        self._hooks = hooks
        self.options = options
        self.egress_rules = options.egress
        self._persist = persist
        if not self._restored:
            self._restored = True
            if stored and self.phase is Phase.STOPPED:
                status = stored.get("status", "stopped")
                if status in ("running", "healthy", "stopping", "paused"):
                    # The platform went away while it ran and the container is gone now.
                    status = "stopped"
                self._state = State.at(
                    status, stored.get("last_change", time.time()), stored.get("exit_code")
                )
        self._save_state()
        self.renew()
        self._arm_timer()

    def detach(self, hooks: Hooks) -> None:
        if self._hooks is hooks:
            self._hooks = None
            self._persist = None
        self.manager.forget_if_idle(self)

    @property
    def attached(self) -> bool:
        return self._hooks is not None

    @property
    def busy(self) -> bool:
        """True while anything keeps the object's instance worth keeping in memory."""
        return self.phase is not Phase.STOPPED or self._inflight > 0 or bool(self._tasks)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def starting(self) -> bool:
        """A start is under way: the engine is creating the container, or it runs and the
        ports its start waits for do not answer yet."""
        return self._start_task is not None

    def idle_seconds(self) -> float:
        """Seconds since the last request, response body or WebSocket frame."""
        return 0.0 if self._inflight else self._loop.time() - self.last_active

    @property
    def state(self) -> State:
        return self._state

    # -- requests --------------------------------------------------------------------------

    def lease(self) -> Lease:
        self._inflight += 1
        self.renew()
        return Lease(self)

    def _lease_released(self) -> None:
        self._inflight -= 1
        self.renew()
        if self._inflight <= self._gated:
            self._drained.set()
        if self._inflight == 0:
            with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter exit)
                self._arm_timer()
            self.manager.forget_if_idle(self)

    def renew(self) -> None:
        """Push the sleep deadline to ``sleep_after`` from now."""
        self.last_active = self._loop.time()
        if self.options is not None:
            self._deadline = self.last_active + self.options.sleep_after

    async def ready(self, port: int, *, healthy: bool = True) -> int:
        """Start the container if needed, wait until ``port`` answers; its host port.

        The container is then healthy: the port its caller waited for answers. A caller
        that waits for more ports passes ``healthy=False`` and says so once all answer.
        """
        if not self._gate.is_set():
            await self._wait_at_gate()
        while True:
            phase = self.phase
            if phase is Phase.HEALTHY and port in self._ready_ports:
                return self.host_port(port)
            if phase is Phase.RUNNING and port in self._ready_ports and self._start_task is None:
                if healthy:
                    self._answered()
                return self.host_port(port)
            if self._start_task is not None:
                await asyncio.shield(self._start_task)
            elif phase in (Phase.STOPPED, Phase.PAUSED):
                await asyncio.shield(self._begin_start([port], StartOverrides()))
            elif phase in (Phase.RUNNING, Phase.HEALTHY):
                await asyncio.shield(self._probe(port))
            elif phase is Phase.STOPPING:
                await self._stopped.wait()
            elif phase is Phase.UNKNOWN:
                raise EngineUnavailable("engine unavailable")
            else:  # STARTING is always covered by _start_task
                raise ContainerError(f"{self} is {phase.value} with no start under way")

    async def start(self, ports: list[int] | None, overrides: StartOverrides) -> None:
        """Start if not running (thaw if paused); with ``ports``, wait until they answer."""
        while self._start_task is not None:
            await asyncio.shield(self._start_task)
        if self.phase is Phase.STOPPING:
            await self._stopped.wait()
        if self.phase in (Phase.STOPPED, Phase.PAUSED):
            await asyncio.shield(self._begin_start(ports or [], overrides))
        for port in ports or []:
            await self.ready(port, healthy=False)
        if ports:
            self._answered()

    def _answered(self) -> None:
        """Every port a caller waited for answers: a running container is now healthy."""
        if self.phase is Phase.RUNNING and self._start_task is None:
            self._enter(Phase.HEALTHY)

    def host_port(self, port: int) -> int:
        info = self.info
        if info is None:
            raise ContainerGone(f"{self} is not running")
        host_port = info.host_ports.get(port)
        if host_port is None:
            published = ", ".join(str(p) for p in sorted(info.host_ports)) or "none"
            raise ContainerError(
                f"port {port} of the container is not published (published: {published}); "
                "list it in default_port or required_ports of the Container class"
            )
        return host_port

    def target(self, port: int, host_port: int) -> Target:
        """Where requests to ``port`` (published as ``host_port``) connect: inside the
        container's network namespace when this process may enter it, else the host port."""
        info = self.info
        if info is None or not self.manager.upstream_in_namespace:
            return host_port
        cached = self._targets
        if cached is None or cached[0] is not info:
            cached = self._targets = (info, {})
        target = cached[1].get(port)
        if target is None:
            target = cached[1][port] = InNamespace(info.id, info.pid, port, host_port)
        return target

    def own(self, task: asyncio.Task[Any]) -> None:
        """Keep ``task`` (a WebSocket bridge, a hook call) until it ends or ``aclose``."""
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background work failed", self, exc_info=task.exception())

    def lost(self, error: BaseException) -> ContainerGone:
        """The error for a request whose connection to the container broke."""
        if self.info is not None:
            return ContainerGone(f"the connection to {self} broke mid-request ({error})")
        return ContainerGone(
            f"{self} stopped while handling the request (exit code {self._state.exit_code})"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def signal(self, signal: int, *, reason: StopReason = "stop") -> bool:
        """Send ``signal`` and return (``Container.stop``, as Cloudflare's): nothing
        escalates. False when no container runs."""
        await self._let_start_finish()
        info = self.info
        if info is None:
            return False
        self._stop_reason = self._stop_reason or reason
        try:
            if self.phase is Phase.PAUSED:
                # A frozen process cannot act on a signal: thaw it first.
                await self.manager.runtime.unpause(info.id)
            if self.phase is not Phase.STOPPING:
                self._enter(Phase.STOPPING)
            await self.manager.runtime.signal(info.id, signal)
        except ContainerGone:
            pass
        return True

    async def stop(self, signal: int, *, reason: StopReason = "stop", grace: float) -> None:
        """A platform stop: signal the container, wait for it to end, SIGKILL after
        ``grace`` seconds."""
        if not await self.signal(signal, reason=reason):
            return
        try:
            await asyncio.wait_for(self._stopped.wait(), grace)
        except TimeoutError:
            log.warning("%s did not stop within %ss; killing it", self, grace)
            await self.destroy(reason=self._stop_reason or reason)

    async def destroy(self, *, reason: StopReason = "destroy") -> None:
        """Kill the container now and wait until its end is recorded."""
        await self._let_start_finish()
        info = self.info
        if info is None:
            return
        self._stop_reason = (
            reason if self._stop_reason in (None, "stop", "sleep") else self._stop_reason
        )
        with contextlib.suppress(ContainerGone):
            await self.manager.runtime.kill(info.id)
        await self._stopped.wait()

    async def replace(self, *, grace: float) -> bool:
        """A rollout step for this object: let the requests in flight finish (new ones
        wait), stop the container (SIGTERM, SIGKILL after ``grace``) and start it again
        right away on the class's current image; the waiting requests then go to the new
        one, so none fails. False when no container ran (the next start takes the new
        image anyway)."""
        await self._let_start_finish()
        if self.info is None or self.phase is Phase.UNKNOWN or not self._gate.is_set():
            return False
        self._gate.clear()
        try:
            if self._inflight > self._gated:
                self._drained.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), grace)
            await self.stop(15, reason="rollout", grace=grace)
            assert self.options is not None
            # Not through ready(): that would wait at the gate this holds.
            ports = list(self.options.ports_to_check)
            await asyncio.shield(self._begin_start(ports, StartOverrides()))
        finally:
            self._gate.set()
        return True

    async def _wait_at_gate(self) -> None:
        self._gated += 1
        if self._inflight <= self._gated:
            self._drained.set()
        try:
            await self._gate.wait()
        finally:
            self._gated -= 1

    async def pause(self) -> None:
        """Freeze the running container; the next request (or ``start``) thaws it."""
        await self._let_start_finish()
        info = self.info
        if info is None or self.phase not in (Phase.RUNNING, Phase.HEALTHY):
            return
        await self.manager.runtime.pause(info.id)
        self._enter(Phase.PAUSED)
        assert self.options is not None
        self._deadline = self._loop.time() + self.options.stop_paused_after
        self._arm_timer()

    async def _let_start_finish(self) -> None:
        """A stop asked for during a start applies to what that start made (otherwise
        the container would come up right after the stop). Hooks called by the start
        itself (on_start, on_error) do not wait for it."""
        while self._start_task is not None and self._start_task is not asyncio.current_task():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._start_task)

    def adopt(self, info: ContainerInfo) -> None:
        """Take over a container found running on the engine (after a restart)."""
        self.info = info
        self._ready_ports = set(info.host_ports)
        if info.status == "paused":
            self._enter(Phase.PAUSED)
        else:
            self._enter(Phase.HEALTHY)
        self._watch()
        if self.egress_rules.needs_proxy and self._egress_unavailable() is None:
            # The proxy died with the process that ran it; the container still has its
            # environment pointing at the port, so listen there again.
            self.own(asyncio.get_running_loop().create_task(self._open_egress()))
        log.info("%s adopted running container %s", self, info.name)

    async def let_go(self) -> None:
        """Stop watching the container but leave it running (the next process of this
        app on the node adopts it)."""
        self._closed = True
        self._cancel_timer()
        tasks = [*self._tasks, *self._probes.values()]
        if self._start_task is not None:
            tasks.append(self._start_task)
        if self._monitor is not None:
            tasks.append(self._monitor)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_egress()

    async def aclose(self, grace: float) -> None:
        """Platform shutdown: stop the container (SIGTERM, SIGKILL after ``grace``)."""
        self._closed = True
        self._cancel_timer()
        if self._start_task is not None:
            self._start_task.cancel()
            await asyncio.gather(self._start_task, return_exceptions=True)
        if self.info is not None and self.phase is not Phase.UNKNOWN:
            try:
                await self.stop(15, reason="shutdown", grace=grace)
            except ContainerError as exc:
                log.warning("%s: could not stop it: %s", self, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stopped.wait(), self.manager.settings.exit_record_timeout
                )
        tasks = [*self._tasks, *self._probes.values()]
        if self._monitor is not None:
            tasks.append(self._monitor)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_egress()

    # -- starting --------------------------------------------------------------------------

    def _begin_start(self, ports: list[int], overrides: StartOverrides) -> asyncio.Task[None]:
        if self._closed:
            raise ContainerError(f"{self}: the platform is shutting down")
        task = asyncio.get_running_loop().create_task(self._start(ports, overrides))
        self._start_task = task
        task.add_done_callback(self._start_done)
        return task

    async def _start(self, ports: list[int], overrides: StartOverrides) -> None:
        try:
            await self._run_start(ports, overrides)
        finally:
            # Cleared in the step that ends the start, not by a done callback one loop
            # step later: a caller woken in between (by on_start, say) would find the
            # finished task still set, await it without yielding and loop for ever.
            if self._start_task is asyncio.current_task():
                self._start_task = None

    def _start_done(self, task: asyncio.Task[None]) -> None:
        if self._start_task is task:
            self._start_task = None  # cancelled before its first step
        if not task.cancelled():
            task.exception()  # every caller re-raises its own copy; this one is retrieved

    async def _run_start(self, ports: list[int], overrides: StartOverrides) -> None:
        options = self.options
        assert options is not None, f"{self} has no options: no instance ever attached"
        if self.phase is Phase.PAUSED:
            # A thawed container carries on exactly where it was: no start, no probes.
            assert self.info is not None
            self._enter(Phase.STARTING)
            try:
                await self.manager.runtime.unpause(self.info.id)
            except BaseException:
                self._enter(Phase.PAUSED if self.info is not None else Phase.STOPPED)
                raise
            self.renew()
            self._enter(Phase.HEALTHY)
            self._arm_timer()
            return
        error: BaseException
        began = time.monotonic()
        try:
            await self._launch(options, ports, overrides)
        except TimeoutError:
            error = StartFailed(
                f"the engine did not start the container within {options.start_timeout}s"
            )
            kind = "timeout"
        except ContainerError as exc:
            error = exc
            kind = _failure_kind(exc)
        except asyncio.CancelledError:
            await self._abandon()
            raise
        else:
            elapsed = time.monotonic() - began
            self.manager.record(
                self,
                "container.start",
                f"container started in {elapsed * 1000:.0f} ms",
                container_id=self.info.id if self.info is not None else "",
                cold_start_ms=round(elapsed * 1000, 1),
            )
            hooks = await self._attached_hooks()
            if hooks is not None:
                await hooks.on_start()
            return
        self.manager.record(
            self,
            "container.start_failed",
            f"container did not start: {error}",  # the operator's log: the whole story
            level="error",
            reason=kind,
        )
        if not isinstance(error, EngineUnavailable):
            await self._abandon()
        hooks = await self._attached_hooks()
        if hooks is not None:
            await hooks.on_error(error)
        raise error

    async def _launch(
        self, options: ContainerOptions, ports: list[int], overrides: StartOverrides
    ) -> None:
        self._enter(Phase.STARTING)
        boost = options.start_boost and self.manager.settings.start_boost
        env = {**options.env_vars, **(overrides.env_vars or {})}
        entrypoint = overrides.entrypoint or options.entrypoint
        internet = (
            options.enable_internet
            if overrides.enable_internet is None
            else overrides.enable_internet
        )
        self.egress_rules = self.egress_rules.replace(enable_internet=internet)
        if self.egress_rules.needs_proxy:
            self._check_egress(options)
            # Off the internet; the proxy on the container's loopback is its way out.
            env = {**env, **proxy_env(self.manager.settings.egress_proxy_port)}
            internet = False
        try:
            async with asyncio.timeout(options.start_timeout):
                self.info = await self.manager.launch(
                    self,
                    options,
                    env=env,
                    entrypoint=entrypoint,
                    enable_internet=internet,
                    ports=sorted({*options.declared_ports, *ports}),
                    boost=boost,
                    extra_labels={**dict(options.labels), **(overrides.labels or {})},
                )
        except BaseException:
            if self.info is None:
                self._enter(Phase.STOPPED)
            raise
        self._stop_reason = None
        self._ready_ports = set()
        self._boosted = boost
        self._watch()
        self.renew()
        self._enter(Phase.RUNNING)
        if self.egress_rules.needs_proxy:
            await self._open_egress()
        self._arm_timer()
        if not ports and boost and options.ports_to_check:
            # A start that waits for no port (start_and_wait_for_ports() waits after it):
            # the quota comes once the class's ports answer, in the background.
            info = self.info
            end = self._end_boost_when_ready(options.ports_to_check, info)
            self.own(asyncio.get_running_loop().create_task(end))
        elif not ports:
            await self._end_boost()  # no port to wait for: no reason to boost
        for port in sorted(set(ports)):
            await self._probe(port)
        if ports:
            await self._end_boost()  # every port this start waited for answers
        if ports and self.phase is Phase.RUNNING:
            self._enter(Phase.HEALTHY)

    def _probe(self, port: int) -> asyncio.Task[None]:
        """One readiness probe per port at a time, shared by everyone who waits for it."""
        task = self._probes.get(port)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._wait_port(port))
            self._probes[port] = task
            task.add_done_callback(lambda t: self._forget_probe(port, t))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    def _forget_probe(self, port: int, task: asyncio.Task[None]) -> None:
        if self._probes.get(port) is task:  # never a newer probe of the same port
            del self._probes[port]

    async def _wait_port(self, port: int) -> None:
        assert self.options is not None
        try:
            await wait_for_port(
                self,
                port,
                self.options.readiness,
                stopped=self._stopped,
                exit_code=lambda: self._state.exit_code,
            )
        finally:
            # As for the start task: a finished probe is never handed out again, or
            # ready() could await it without yielding and loop for ever.
            current = asyncio.current_task()
            assert current is not None
            self._forget_probe(port, current)
        # (The phase is left to whoever waited for the port: the probes that end the start
        # boost must not call a container healthy while a port its caller waits for is shut.)
        self._ready_ports.add(port)

    async def _end_boost_when_ready(self, ports: list[int], info: ContainerInfo | None) -> None:
        """The quota once every port answers, or once probing gave up (never boosted for
        long); not if another container has replaced ``info`` meanwhile."""
        with contextlib.suppress(ContainerError):
            for port in sorted(set(ports)):
                await self._probe(port)
        if self.info is info:
            await self._end_boost()

    async def _end_boost(self) -> None:
        """The container started without its CPU quota; it gets it once a port answered."""
        if self._boosted and self.info is not None:
            self._boosted = False
            await self.manager.apply_cpu_quota(self)

    async def _abandon(self) -> None:
        """A start that failed halfway leaves nothing running."""
        info = self.info
        if info is None:
            return
        self._stop_reason = "destroy"
        try:
            await self.manager.runtime.kill(info.id)
        except ContainerError as exc:
            log.warning("%s: could not kill a failed start: %s", self, exc)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), self.manager.settings.exit_record_timeout)

    # -- egress control (outbound.py) ---------------------------------------------------

    def _egress_unavailable(self) -> str | None:
        runtime = self.manager.runtime
        if not isinstance(runtime, EgressListeners):
            return "a runtime that can listen inside containers (see EgressListeners)"
        return runtime.egress_listeners

    def _check_egress(self, options: ContainerOptions) -> None:
        """Refuse to start a container whose egress rules could not be applied: never run
        it with its traffic let out."""
        missing = self._egress_unavailable()
        port = self.manager.settings.egress_proxy_port
        if missing is None and port in options.declared_ports:
            missing = f"a proxy port other than {port}, which the class declares"
        if missing is not None:
            raise StartFailed(
                f"{self.class_name} uses egress control (allowed_hosts, denied_hosts or "
                f"outbound handlers), which needs {missing}; see docs/egress.md"
            )

    async def _open_egress(self) -> None:
        """Listen for the container's outbound HTTP inside its own namespace."""
        info = self.info
        runtime = self.manager.runtime
        assert info is not None and isinstance(runtime, EgressListeners)
        settings = self.manager.settings
        sock = await runtime.listen_in_container(info.id, settings.egress_proxy_port)
        proxy = EgressProxy(
            repr(self),
            lambda: self.egress_rules,
            self._run_outbound,
            self.manager.session,
            hosts=settings.egress_hosts,
        )
        try:
            await proxy.start(sock)
        except BaseException:
            sock.close()
            raise
        await self._close_egress()
        self._egress_proxy = proxy

    async def _close_egress(self) -> None:
        proxy, self._egress_proxy = self._egress_proxy, None
        if proxy is not None:
            await proxy.aclose()

    async def _run_outbound(self, handler: Handler, request: Request) -> Response:
        hooks = await self._attached_hooks()
        if hooks is None:
            raise ContainerError(f"{self}: no instance of the object to run the handler")
        return await call_handler(hooks, handler, request)

    def set_egress_rules(self, rules: EgressRules) -> None:
        """New rules from a setter: the proxy applies them from the next request."""
        self.egress_rules = rules
        if rules.needs_proxy and self.info is not None and self._egress_proxy is None:
            log.warning(
                "%s runs without an egress proxy; the new rules apply from its next start",
                self,
            )

    # -- the exit monitor -------------------------------------------------------------------

    def _watch(self) -> None:
        self._stopped.clear()
        self._monitor = asyncio.get_running_loop().create_task(self._watch_exit())

    async def _watch_exit(self) -> None:
        info = self.info
        assert info is not None
        status = await self._wait_exit(info)
        try:
            self.last_output = [line async for line in self.manager.runtime.logs(info.id, tail=5)]
        except ContainerError:
            self.last_output = []
        try:
            await self.manager.runtime.remove(info.id)
        except ContainerError as exc:
            log.warning("Could not remove container %s: %s", info.name, exc)
        platform = info.id in self.manager.platform_stops
        reason: StopReason = "oom" if status.oom_killed else self._stop_reason or "exit"
        if platform and reason == "exit":
            reason = "shutdown"
        self._stop_reason = None
        self.info = None
        self._ready_ports = set()
        self._cancel_timer()
        await self._close_egress()
        self.manager.exited(self, info.id)
        if reason == "oom":
            log.warning("%s was killed for running out of memory", self)
        elif reason == "exit" and self.last_output:
            log.info(
                "%s exited with code %s; last output: %s",
                self,
                status.exit_code,
                " | ".join(self.last_output),
            )
        self._enter(Phase.STOPPED, status.exit_code, stopped_by_itself=reason in ("exit", "oom"))
        self._stopped.set()
        params = StopParams.of(status.exit_code, reason)
        self.manager.record(
            self,
            "container.oom" if reason == "oom" else "container.stop",
            f"container stopped ({reason}), exit code {status.exit_code}",
            container_id=info.id,
            level="error" if reason == "oom" else "info",
            exit_code=status.exit_code,
            reason=params.reason,
            detail=reason,
        )
        hooks = self._hooks
        if hooks is not None:
            try:
                await hooks.on_stop(params)
            except Exception:
                log.exception("%s: on_stop failed", self)
        self.manager.forget_if_idle(self)

    async def _wait_exit(self, info: ContainerInfo) -> ExitStatus:
        """Wait for the container to end. An engine that does not answer is not an exit:
        the phase becomes UNKNOWN and the engine is asked again, with back-off, until it
        says whether the container still runs."""
        settings = self.manager.settings
        delay = settings.engine_retry_initial
        before: Phase | None = None
        while True:
            if self.phase is Phase.UNKNOWN:
                # A wait on a running container only returns when it exits: ask first,
                # or the phase would stay unknown (and requests 503) until then.
                current = await self._inspect_quietly(info.id)
                if current is not None and current.running:
                    log.info("%s: engine back; the container still runs", self)
                    self._enter(
                        before if before in (Phase.RUNNING, Phase.PAUSED) else Phase.HEALTHY
                    )
                    delay = settings.engine_retry_initial
            try:
                status = await self.manager.runtime.wait(info.id)
            except EngineUnavailable as exc:
                if self.phase is not Phase.UNKNOWN:
                    before = self.phase
                    log.warning("%s: engine unavailable (%s); retrying", self, exc)
                    self._enter(Phase.UNKNOWN)
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.engine_retry_max)
                continue
            except ContainerGone:
                return ExitStatus(exit_code=-1, oom_killed=False)
            except ContainerError as exc:
                log.warning("%s: waiting for its exit failed (%s); asking again", self, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, settings.engine_retry_max)
                continue
            if self.phase is Phase.UNKNOWN:
                current = await self._inspect_quietly(info.id)
                if current is not None and current.running:
                    # The engine is back and the container never stopped.
                    log.info("%s: engine back; the container still runs", self)
                    self._enter(
                        before if before in (Phase.RUNNING, Phase.PAUSED) else Phase.HEALTHY
                    )
                    delay = settings.engine_retry_initial
                    continue
            return status

    async def _inspect_quietly(self, container_id: str) -> ContainerInfo | None:
        try:
            return await self.manager.runtime.inspect(container_id)
        except ContainerError:
            return None

    # -- sleep ------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self.options is None or self.phase not in (Phase.RUNNING, Phase.HEALTHY, Phase.PAUSED):
            return
        if self._timer is not None:
            if self._timer.when() <= self._deadline:
                return  # it fires no later than the deadline and re-arms itself if moved
            self._timer.cancel()
        self._timer = self._loop.call_at(self._deadline, self._timer_fired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        if self._closed or self.phase not in (Phase.RUNNING, Phase.HEALTHY, Phase.PAUSED):
            return
        if self._inflight > 0 and self.phase is not Phase.PAUSED:
            return  # the last lease to be released arms the timer again
        if self._loop.time() < self._deadline:
            self._arm_timer()
            return
        self.own(asyncio.get_running_loop().create_task(self._expire()))

    async def _expire(self) -> None:
        assert self.options is not None
        if self.phase is Phase.PAUSED:
            log.info(
                "%s paused for %ss without requests; stopping it",
                self,
                self.options.stop_paused_after,
            )
            await self.stop(15, reason="sleep", grace=self.options.stop_timeout)
            return
        hooks = await self._attached_hooks()
        if hooks is None:
            return
        await hooks.on_activity_expired()
        if self.phase in (Phase.RUNNING, Phase.HEALTHY, Phase.PAUSED) and self._timer is None:
            # Still running (busy, or an override chose to keep it): look again later.
            if self.phase is not Phase.PAUSED:
                self.renew()
            self._arm_timer()

    async def default_activity_expired(self) -> None:
        """What ``on_activity_expired`` does unless overridden: sleep as ``sleep_mode`` says."""
        assert self.options is not None
        if self._inflight > 0:
            return
        if self.options.sleep_mode == "pause":
            await self.pause()
        else:
            await self.stop(15, reason="sleep", grace=self.options.stop_timeout)

    # -- hooks and state ---------------------------------------------------------------------

    async def _attached_hooks(self) -> Hooks | None:
        if self._hooks is None and not self._closed:
            with contextlib.suppress(Exception):
                await self.manager.wake(self)
        return self._hooks

    def _enter(
        self, phase: Phase, exit_code: int | None = None, *, stopped_by_itself: bool = False
    ) -> None:
        if phase is not self.phase and phase not in TRANSITIONS[self.phase]:
            raise AssertionError(f"{self}: no transition from {self.phase.value} to {phase.value}")
        self.phase = phase
        status: Status | None
        if phase is Phase.STOPPED:
            status = "stopped_with_code" if stopped_by_itself else "stopped"
        elif phase is Phase.STARTING or phase is Phase.UNKNOWN:
            status = None  # as before, until the engine says otherwise
        else:
            status = phase.value
        if status is not None:
            self._state = State.at(status, time.time(), exit_code)
            self._save_state()
        self.manager.phase_changed(self)

    def _save_state(self) -> None:
        if self._persist is not None:
            try:
                self._persist(_stored(self._state))
            except Exception:
                log.exception("%s: could not store its state", self)


def _stored(state: State) -> dict[str, Any]:
    """A state as the object's internal storage keeps it."""
    return {"status": state.status, "last_change": state.last_change, "exit_code": state.exit_code}


def _failure_kind(error: ContainerError) -> str:
    """A start failure's kind, from a fixed set (a metric label: bounded). A start the
    engine did not carry out in time is "timeout" (set where the timeout is caught)."""
    for kind, name in (
        (EngineUnavailable, "engine"),
        (ImageError, "image"),
        (NoCapacity, "capacity"),
        (TooManyStarts, "rate"),
        # It ran but did not get ready: exited, or its ports did not answer in time.
        (StartFailed, "start"),
    ):
        if isinstance(error, kind):
            return name
    return "error"
