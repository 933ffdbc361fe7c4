"""``Container``: a Durable Object that owns one container and proxies to it.

A request to a stopped object starts the container (one start shared by every
concurrent caller), waits until the port answers HTTP, then forwards. The object's
alarm puts the container to sleep ``sleep_after`` after the last activity; requests in
flight and open WebSockets are never idle. ``on_stop`` runs once per container run,
with the real exit code and why it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from typing import Any, ClassVar, Literal

from ..durations import parse_duration
from ..errors import ContainerError, ContainerGone, DockyardError, StartFailed
from ..http import HeadersInit, Request, Response
from ..objects import DurableObject
from .manager import ContainerHandle
from .proxy import forward_http, forward_websocket
from .readiness import Readiness, wait_for_port
from .runtime import ExecProcess, ExecResult, ExitStatus
from .schedules import Schedule, ScheduleTable
from .state import State, Status, StopParams, StopReason, signal_number

__all__ = ["SWITCH_PORT_HEADER", "Container"]

log = logging.getLogger("dockyard.containers")

SWITCH_PORT_HEADER = "dockyard-container-target-port"
# Accepted too, so code written for Cloudflare's switchPort keeps working.
CF_SWITCH_PORT_HEADER = "cf-container-target-port"
STATE_KEY = "__dockyard_container_state"


class Container(DurableObject):
    default_port: ClassVar[int | None] = None
    required_ports: ClassVar[list[int]] = []
    sleep_after: ClassVar[str | int | float] = "10m"
    env_vars: ClassVar[dict[str, str]] = {}
    entrypoint: ClassVar[list[str] | None] = None
    enable_internet: ClassVar[bool] = True
    # Host and path of the readiness probe: "ping" probes "/" with Host: ping.
    ping_endpoint: ClassVar[str] = "ping"
    # Budgets of a start: the engine starting the container, then its ports answering.
    start_timeout: ClassVar[float] = 8.0
    port_timeout: ClassVar[float] = 20.0
    # Probes back off from 10 ms up to this interval between tries.
    wait_interval: ClassVar[float] = 0.3
    probe_timeout: ClassVar[float] = 5.0
    # stop() and sleep send SIGTERM, then SIGKILL after this many seconds.
    stop_timeout: ClassVar[float] = 10.0
    # "stop" ends the container when sleep_after expires; "pause" freezes it instead, so
    # the next request wakes it in milliseconds with its memory intact. A paused
    # container is stopped after stop_paused_after more without requests.
    sleep_mode: ClassVar[Literal["stop", "pause"]] = "stop"
    stop_paused_after: ClassVar[str | int | float] = "1h"

    def __init__(self, ctx: Any, env: Any) -> None:
        super().__init__(ctx, env)
        handle = getattr(ctx, "container", None)
        if not isinstance(handle, ContainerHandle):
            raise ContainerError(
                f"{type(self).__name__} is not configured as a container: add "
                f'{{"class_name": "{type(self).__name__}", "image": "./Dockerfile"}} to '
                "containers in the wrangler config"
            )
        self._handle: ContainerHandle = handle
        self._sleep_after = parse_duration(
            self.sleep_after, where=f"{type(self).__name__}.sleep_after"
        )
        self._deadline = time.monotonic() + self._sleep_after
        if self.sleep_mode not in ("stop", "pause"):
            raise ContainerError(
                f"{type(self).__name__}.sleep_mode must be 'stop' or 'pause', "
                f"got {self.sleep_mode!r}"
            )
        self._stop_paused_after = parse_duration(
            self.stop_paused_after, where=f"{type(self).__name__}.stop_paused_after"
        )
        self._paused_deadline = 0.0
        self._inflight = 0
        self._starting: asyncio.Future[None] | None = None
        self._starter: asyncio.Task[Any] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stop_reason: StopReason | None = None
        self._stopped = asyncio.Event()
        self._stopped.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._schedules = ScheduleTable(ctx.storage.sql)
        self._state = State("stopped", time.time())
        ctx.block_concurrency_while(self._restore())

    # Hooks to override

    async def on_start(self) -> None:
        """Runs after each successful start, once the ports answer."""

    async def on_stop(self, params: StopParams) -> None:
        """Runs once per container run after it ended."""

    async def on_error(self, error: BaseException) -> None:
        """Runs when a start fails; the default logs it and re-raises."""
        log.error("%s %s: %s", type(self).__name__, self._label(), error)
        raise error

    async def on_activity_expired(self) -> None:
        """Runs when ``sleep_after`` passed with nothing in flight; the default puts the
        container to sleep as ``sleep_mode`` says (stop, or pause)."""
        if self.sleep_mode == "pause":
            await self.pause()
        else:
            await self.stop()

    async def pause(self) -> None:
        """Freeze the running container; the next request (or ``start``) thaws it."""
        if self._handle.running and not self._handle.paused:
            await self._handle.pause()
            self._paused_deadline = time.monotonic() + self._stop_paused_after
            await self._set_state("paused")
            await self._arm_alarm()

    # Lifecycle

    async def start(
        self,
        *,
        env_vars: dict[str, str] | None = None,
        entrypoint: list[str] | None = None,
        enable_internet: bool | None = None,
    ) -> None:
        """Start the container if it is not running. Does not wait for its ports."""
        await self._start(None, env_vars, entrypoint, enable_internet)

    async def start_and_wait_for_ports(self, ports: list[int] | int | None = None) -> None:
        """Start if needed and wait until every port answers HTTP (state ``healthy``)."""
        if isinstance(ports, int):
            ports = [ports]
        await self._start(ports or self._ports_to_check(), None, None, None)

    async def stop(self, signal: str | int = "SIGTERM") -> None:
        """Signal the container and wait for it to end (SIGKILL after ``stop_timeout``)."""
        await self._let_start_finish()
        if not self._handle.running:
            return
        self._stop_reason = self._stop_reason or "stop"
        await self._set_state("stopping")
        await self._handle.signal(signal_number(signal))
        try:
            await asyncio.wait_for(self._stopped.wait(), self.stop_timeout)
        except TimeoutError:
            log.warning("%s did not stop within %ss; killing it", self._label(), self.stop_timeout)
            await self._handle.destroy()
            await self._stopped.wait()

    async def destroy(self) -> None:
        """Kill the container now."""
        await self._let_start_finish()
        if not self._handle.running:
            return
        self._stop_reason = "destroy"
        await self._handle.destroy()
        await self._stopped.wait()

    async def get_state(self) -> State:
        return self._state

    async def _let_start_finish(self) -> None:
        """A stop asked for while a start is under way applies to what that start made.

        Returning early instead would let the container come up right after the stop.
        Hooks that run inside the start itself (on_start, on_error) do not wait.
        """
        while self._starting is not None and self._starter is not asyncio.current_task():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._starting)

    def renew_activity_timeout(self) -> None:
        self._deadline = time.monotonic() + self._sleep_after

    # Requests

    async def fetch(self, request: Request) -> Response:
        port_header = request.headers.get(SWITCH_PORT_HEADER) or request.headers.get(
            CF_SWITCH_PORT_HEADER
        )
        if port_header is not None:
            request.headers.popall(SWITCH_PORT_HEADER, None)
            request.headers.popall(CF_SWITCH_PORT_HEADER, None)
            if not port_header.isdigit():
                return Response(f"Bad container port {port_header!r}\n", status=400)
            port: int | None = int(port_header)
        else:
            port = self.default_port
        if port is None:
            return Response(
                f"{type(self).__name__} has no default_port: set default_port on the class, "
                "or route with switch_port(request, port)\n",
                status=500,
            )
        return await self.container_fetch(request, port=port)

    async def container_fetch(
        self,
        request: Request | str,
        port: int | None = None,
        *,
        method: str | None = None,
        headers: HeadersInit = None,
        body: Any = None,
    ) -> Response:
        """Send a request (or a URL, relative ones go to ``http://container``) to a port."""
        if not isinstance(request, Request) or method or headers is not None or body is not None:
            request = Request(request, method=method, headers=headers, body=body)
        port = port or self.default_port or next(iter(self.required_ports), None)
        if port is None:
            return Response("No port to send the request to\n", status=500)
        self._inflight += 1
        self.renew_activity_timeout()
        handle = self._handle
        try:
            if not (handle.running and not handle.paused and self._state.status == "healthy"):
                await self._start([port], None, None, None)
            host_port = handle.host_port(port)
        except DockyardError as exc:
            self._request_done()
            return _start_failure(exc)
        session = self._handle.manager.session
        if request.is_websocket:
            return await forward_websocket(
                session,
                host_port,
                request,
                on_message=self.renew_activity_timeout,
                on_finished=self._request_done,
                on_lost=self._lost,
                tasks=self._tasks,
            )
        try:
            return await forward_http(
                session,
                self._handle.manager.upstream,
                host_port,
                request,
                on_finished=self._request_done,
                on_lost=self._lost,
            )
        except ContainerGone as exc:
            return Response(f"{exc}\n", status=exc.status)

    # Exec

    async def exec(
        self,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """Run a command in the running container; returns exit code, stdout and stderr."""
        info = self._require_running("exec")
        if self._handle.paused:
            await self._start(None, None, None, None)
        return await self._handle.runtime.exec(info, cmd, env=env, workdir=workdir, user=user)

    def exec_stream(
        self,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> ExecProcess:
        """``async with container.exec_stream(cmd) as proc: async for stream, chunk in proc``."""
        info = self._require_running("exec_stream")
        if self._handle.paused:
            raise ContainerError(
                f"exec_stream: {self._label()} is paused; call start() to wake it first"
            )
        return self._handle.runtime.exec_stream(info, cmd, env=env, workdir=workdir, user=user)

    # Schedules

    async def schedule(
        self, when: datetime | float | int, method_name: str, payload: Any = None
    ) -> Schedule:
        """Call ``method_name(payload)`` once at ``when`` (a datetime, or seconds from now)."""
        method = getattr(self, method_name, None)
        if method_name.startswith("_") or not callable(method):
            raise ContainerError(
                f"schedule(): {type(self).__name__} has no public method {method_name!r}"
            )
        row = self._schedules.add(when, method_name, payload)
        await self._arm_alarm()
        return row

    async def get_schedule(self, schedule_id: str) -> Schedule | None:
        return self._schedules.get(schedule_id)

    async def list_schedules(self) -> list[Schedule]:
        return self._schedules.all()

    async def delete_schedule(self, schedule_id: str) -> bool:
        deleted = self._schedules.delete(schedule_id)
        await self._arm_alarm()
        return deleted

    # The alarm drives schedules and sleep.

    async def alarm(self, info: Any) -> None:
        for row in self._schedules.due(time.time()):
            try:
                result = getattr(self, row.callback)(row.payload)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("%s: scheduled call %s failed", self._label(), row.callback)
            finally:
                self._schedules.delete(row.id)
        if self._handle.paused:
            if time.monotonic() >= self._paused_deadline:
                await self.stop()
        elif self._handle.running and time.monotonic() >= self._deadline:
            if self._inflight == 0:
                await self.on_activity_expired()
            # Busy (or an override chose to keep running): look again after sleep_after.
            if self._handle.running:
                self.renew_activity_timeout()
        await self._arm_alarm()

    async def _arm_alarm(self) -> None:
        due: list[float] = []
        if self._handle.running:
            deadline = self._paused_deadline if self._handle.paused else self._deadline
            due.append(time.time() + max(0.0, deadline - time.monotonic()))
        next_schedule = self._schedules.next_time()
        if next_schedule is not None:
            due.append(next_schedule)
        if due:
            await self.ctx.storage.set_alarm(min(due) * 1000)
        else:
            await self.ctx.storage.delete_alarm()

    # Internals

    def _dockyard_keep_alive(self) -> bool:
        return self._handle.running or self._inflight > 0 or self._starting is not None

    async def _dockyard_close(self) -> None:
        monitor = [self._monitor] if self._monitor else []
        for task in [*self._tasks, *monitor]:
            task.cancel()
        await asyncio.gather(*self._tasks, *monitor, return_exceptions=True)
        # This instance is going (a reload of the worker, a reset): its container is not.
        # The next instance of the object takes it over instead of starting another.
        self._handle.detach()

    def _label(self) -> str:
        name = getattr(self.ctx.id, "name", None)
        return f"container {type(self).__name__}({name or str(self.ctx.id)[:12]})"

    def _readiness(self) -> Readiness:
        return Readiness(
            self.ping_endpoint, self.port_timeout, self.probe_timeout, self.wait_interval
        )

    def _ports_to_check(self) -> list[int]:
        if self.required_ports:
            return list(self.required_ports)
        return [self.default_port] if self.default_port is not None else []

    def _published_ports(self) -> list[int]:
        return sorted({*self.required_ports, *([self.default_port] if self.default_port else [])})

    def _require_running(self, what: str) -> str:
        if self._handle.info is None:
            raise ContainerError(f"{what}: {self._label()} is not running; call start() first")
        return self._handle.info.id

    async def _restore(self) -> None:
        stored = await self.ctx.storage.get(STATE_KEY)
        if stored:
            self._state = State(stored["status"], stored["last_change"], stored.get("exit_code"))
        info = self._handle.adopt()
        if info is not None:
            log.info("%s adopted running container %s", self._label(), info.name)
            self._watch()
            if self._handle.paused:
                self._paused_deadline = time.monotonic() + self._stop_paused_after
                await self._set_state("paused")
            elif self._state.status not in ("running", "healthy"):
                await self._set_state("healthy")
            await self._arm_alarm()
        elif self._state.status in ("running", "healthy", "stopping"):
            # The platform went away while it ran and the container is gone now.
            await self._set_state("stopped")

    async def _start(
        self,
        ports: list[int] | None,
        env_vars: dict[str, str] | None,
        entrypoint: list[str] | None,
        enable_internet: bool | None,
    ) -> None:
        while self._starting is not None:
            # Everyone asking while a start is under way shares that one start.
            await asyncio.shield(self._starting)
        ready = ports is None or self._state.status == "healthy"
        if self._handle.running and not self._handle.paused and ready:
            return
        self._starting = asyncio.get_running_loop().create_future()
        self._starter = asyncio.current_task()
        try:
            await self._start_once(ports, env_vars, entrypoint, enable_internet)
        except BaseException as exc:
            self._starting.set_exception(exc)
            self._starting.exception()  # retrieved here; sharers re-raise their own copy
            raise
        else:
            self._starting.set_result(None)
        finally:
            self._starting = None
            self._starter = None

    async def _start_once(
        self,
        ports: list[int] | None,
        env_vars: dict[str, str] | None,
        entrypoint: list[str] | None,
        enable_internet: bool | None,
    ) -> None:
        if self._handle.paused:
            # A thawed container carries on exactly where it was: no start, no probes.
            await self._handle.unpause()
            self.renew_activity_timeout()
            await self._set_state("healthy")
            await self._arm_alarm()
            return
        try:
            if not self._handle.running:
                await asyncio.wait_for(
                    self._handle.start(
                        env={**self.env_vars, **(env_vars or {})},
                        entrypoint=entrypoint or self.entrypoint,
                        enable_internet=(
                            self.enable_internet if enable_internet is None else enable_internet
                        ),
                        ports=sorted({*self._published_ports(), *(ports or [])}),
                    ),
                    self.start_timeout,
                )
                self._stop_reason = None
                self._watch()
                self.renew_activity_timeout()
                await self._set_state("running")
                await self._arm_alarm()
            if ports:
                for port in ports:
                    await wait_for_port(
                        self._handle,
                        port,
                        self._readiness(),
                        stopped=self._stopped,
                        exit_code=lambda: self._state.exit_code,
                    )
                await self._set_state("healthy")
        except TimeoutError:
            await self._abandon_start()
            error: BaseException = StartFailed(
                f"the engine did not start the container within {self.start_timeout}s"
            )
        except DockyardError as exc:
            if isinstance(exc, StartFailed):
                await self._abandon_start()
            error = exc
        else:
            await self.on_start()
            return
        await self.on_error(error)
        raise error

    async def _abandon_start(self) -> None:
        """A start that failed halfway leaves nothing running."""
        if self._handle.running:
            self._stop_reason = "destroy"
            await self._handle.destroy()
            await self._stopped.wait()

    def _watch(self) -> None:
        self._stopped.clear()
        self._monitor = asyncio.create_task(self._watch_exit())

    async def _watch_exit(self) -> None:
        status: ExitStatus = await self._handle.monitor()
        asked: StopReason | None = "stop" if self._handle.stopped_by_platform else None
        reason: StopReason = "oom" if status.oom_killed else (self._stop_reason or asked or "exit")
        self._stop_reason = None
        if reason == "oom":
            log.warning(
                "%s was killed for running out of memory (limit %s MiB)",
                self._label(),
                self._handle.manager.classes[self._handle.class_name].config.resources.memory_mib,
            )
        if reason in ("stop", "destroy"):
            await self._set_state("stopped", status.exit_code)
        else:
            await self._set_state("stopped_with_code", status.exit_code)
        self._stopped.set()
        try:
            await self.on_stop(StopParams(exit_code=status.exit_code, reason=reason))
        except Exception:
            log.exception("%s: on_stop failed", self._label())
        await self._arm_alarm()

    def _request_done(self) -> None:
        self._inflight -= 1
        self.renew_activity_timeout()

    def _lost(self, error: BaseException) -> ContainerGone:
        if self._handle.running:
            return ContainerGone(
                f"the connection to {self._label()} broke mid-request ({error}); try again"
            )
        return ContainerGone(
            f"{self._label()} stopped while handling the request "
            f"(exit code {self._state.exit_code}); try again"
        )

    async def _set_state(self, status: Status, exit_code: int | None = None) -> None:
        self._state = State(status, time.time(), exit_code)
        await self.ctx.storage.put(
            STATE_KEY,
            {"status": status, "last_change": self._state.last_change, "exit_code": exit_code},
        )


def _start_failure(error: DockyardError) -> Response:
    if error.status in (429, 503):
        return Response(f"{error}\n", status=error.status)
    return Response(f"Failed to start container: {error}\n", status=500)
