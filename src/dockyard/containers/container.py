"""``Container``: a Durable Object that owns one container and proxies to it.

A request to a stopped object starts the container (one start shared by every
concurrent caller), waits until the port answers HTTP, then forwards. The container
sleeps ``sleep_after`` after the last activity; requests in flight and open WebSockets
are never idle. ``on_stop`` runs once per container run, with the real exit code and
why it ended.

This class is a thin facade: the machinery lives in the node's
``ContainerSupervisor`` (reached through ``ctx.container``), so a subclass's own
attributes (``self._state``, ``self._handle``, ...) and storage keys never collide with
Dockyard's, and a worker reload hands the running container to the next instance.

Over 400 lines: it is the whole user-facing surface of ``@cloudflare/containers``
(snake_case and camelCase names, hooks, options, schedules), each method a few lines of
delegation; option parsing and schedule shapes live in ``api_shapes.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import weakref
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Literal

from ..durations import parse_duration
from ..errors import ContainerError, DockyardError, error_id
from ..http import HeadersInit, Request, Response, error_response
from ..objects import DurableObject
from .api_shapes import (
    CANCELLATION_KEYS,
    WAIT_KEYS,
    ContainerSchedule,
    known_options,
    positional_capacity,
    start_overrides,
    takes_two,
    within,
)
from .outbound import EgressRules, Handler
from .proxy import forward_http, forward_websocket
from .readiness import Readiness
from .runtime import ExecProcess, ExecResult
from .schedules import ScheduleTable
from .state import State, StopParams, signal_number
from .supervisor import ContainerOptions, ContainerSupervisor, StartOverrides

__all__ = ["CF_SWITCH_PORT_HEADER", "SWITCH_PORT_HEADER", "Container"]

log = logging.getLogger("dockyard.containers")

SWITCH_PORT_HEADER = "dockyard-container-target-port"
# Accepted too, so code written for Cloudflare's switchPort keeps working.
CF_SWITCH_PORT_HEADER = "cf-container-target-port"
# Where the container's last known state is kept, in the object's internal storage.
STATE_KEY = "container_state"
# Egress rules changed at runtime by the setters (kept across restarts, as Cloudflare's).
EGRESS_KEY = "egress_overrides"


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
    # Platform stops (sleep, shutdown) send SIGTERM, then SIGKILL after this many seconds;
    # None takes the node's Settings.containers.stop_grace. stop() never escalates.
    stop_timeout: ClassVar[float | None] = None
    # Engine labels of the class's containers; "dockyard." names are Dockyard's own.
    labels: ClassVar[dict[str, str]] = {}
    # "stop" ends the container when sleep_after expires; "pause" freezes it instead, so
    # the next request wakes it in milliseconds with its memory intact. A paused
    # container is stopped after stop_paused_after more without requests.
    sleep_mode: ClassVar[Literal["stop", "pause"]] = "stop"
    stop_paused_after: ClassVar[str | int | float] = "1h"
    # Start without the instance type's CPU quota; apply it once the ports answer.
    start_boost: ClassVar[bool] = True
    # Hardening (see README, "Container hardening"): capabilities the server needs back
    # (e.g. ["NET_RAW"] for ping), a process limit other than 512, a read-only root
    # filesystem with a writable /tmp.
    cap_add: ClassVar[list[str]] = []
    pids_limit: ClassVar[int | None] = None
    read_only_root: ClassVar[bool] = False
    # Egress control (docs/egress.md, Cloudflare's semantics): host globs ("*" matches any
    # run of characters). allowed_hosts set (even empty) denies every other host;
    # denied_hosts always wins. Handlers answer the container's outbound HTTP requests
    # from here: ``outbound`` (a method ``async def outbound(self, request)``) catches
    # all, ``outbound_by_host`` maps a host glob to a method (or its name). Blocked: 520.
    allowed_hosts: ClassVar[list[str] | None] = None
    denied_hosts: ClassVar[list[str]] = []
    outbound: ClassVar[Handler | None] = None
    outbound_by_host: ClassVar[dict[str, Handler]] = {}

    def __init__(self, ctx: Any, env: Any) -> None:
        super().__init__(ctx, env)
        supervisor = getattr(ctx, "container", None)
        if not isinstance(supervisor, ContainerSupervisor):
            raise ContainerError(
                f"{type(self).__name__} is not configured as a container: add "
                f'{{"class_name": "{type(self).__name__}", "image": "./Dockerfile"}} to '
                "containers in the wrangler config"
            )
        storage = ctx.storage
        supervisor.attach(
            self,
            _options(type(self), supervisor, storage.internal.get(EGRESS_KEY) or {}),
            lambda state: storage.internal.put(STATE_KEY, state),
            storage.internal.get(STATE_KEY),
        )
        # A user's delete_all() drops the alarm too; pending schedules need it back.
        storage.internal.on_delete_all(self._dockyard_arm_alarm)

    # Hooks to override

    # A class ported from TypeScript may define Cloudflare's names instead (onStart,
    # onStop, onError, onActivityExpired): the defaults below call those when present.

    async def on_start(self) -> None:
        """Runs after each successful start, once the ports answer."""
        await _camel_hook(self, "onStart")

    async def on_stop(self, params: StopParams) -> None:
        """Runs once per container run after it ended."""
        await _camel_hook(self, "onStop", params)

    async def on_error(self, error: BaseException) -> None:
        """Runs when a start fails; the default logs it and re-raises."""
        if not await _camel_hook(self, "onError", error):
            log.error("%s: %s", _supervisor(self), error)
            raise error

    async def on_activity_expired(self) -> None:
        """Runs when ``sleep_after`` passed with nothing in flight; the default puts the
        container to sleep as ``sleep_mode`` says (stop, or pause)."""
        if not await _camel_hook(self, "onActivityExpired"):
            await _supervisor(self).default_activity_expired()

    # Lifecycle

    async def start(
        self,
        start_options: Mapping[str, Any] | None = None,
        wait_options: Mapping[str, Any] | None = None,
        *,
        env_vars: dict[str, str] | None = None,
        entrypoint: list[str] | None = None,
        enable_internet: bool | None = None,
    ) -> None:
        """Start the container if it is not running (Cloudflare's ``start``).

        ``start_options``: ``envVars``, ``entrypoint``, ``enableInternet``, ``labels``
        (the keyword arguments say the same). Without ``wait_options`` it does not wait
        for ports; with them (``portToCheck``, ``retries``, ``waitInterval`` in ms,
        ``signal``) it waits for that port as ``wait_for_port`` does.
        """
        overrides = start_overrides(start_options, env_vars, entrypoint, enable_internet)
        await _supervisor(self).start(None, overrides)
        if wait_options is not None:
            await self.wait_for_port(wait_options)

    async def start_and_wait_for_ports(
        self,
        ports: list[int] | int | None = None,
        cancellation_options: Mapping[str, Any] | None = None,
        start_options: Mapping[str, Any] | None = None,
    ) -> None:
        """Start if needed and wait until every port answers HTTP (state ``healthy``).

        ``cancellation_options`` (Cloudflare's): ``instanceGetTimeoutMS`` bounds the start,
        ``portReadyTimeoutMS`` the wait for the ports, ``abort`` (an ``asyncio.Event``)
        gives up when set, ``waitInterval`` is not used (probes back off on their own).
        Giving up ends this call only: the start itself goes on for other callers, within
        the class's ``start_timeout`` and ``port_timeout``.
        """
        supervisor = _supervisor(self)
        options = supervisor.options
        assert options is not None
        wanted = [ports] if isinstance(ports, int) else list(ports or options.ports_to_check)
        cancel = known_options(cancellation_options, CANCELLATION_KEYS, "cancellation_options")
        abort = cancel.get("abort")
        start_ms = cancel.get("instanceGetTimeoutMS")
        await within(
            supervisor.start(None, start_overrides(start_options)),
            start_ms,
            abort,
            f"the container did not start within {start_ms} ms (instanceGetTimeoutMS)",
        )
        ready_ms = cancel.get("portReadyTimeoutMS")
        await within(
            supervisor.start(wanted, StartOverrides()),
            ready_ms,
            abort,
            f"port(s) {', '.join(map(str, wanted))} did not answer within {ready_ms} ms "
            "(portReadyTimeoutMS)",
        )

    async def wait_for_port(
        self, wait_options: Mapping[str, Any] | None = None, *, port: int | None = None
    ) -> None:
        """Wait until a port answers HTTP (Cloudflare's ``waitForPort``); starts the
        container if it is not running.

        ``wait_options``: ``portToCheck`` (default: ``default_port``), ``retries`` and
        ``waitInterval`` (ms; together they bound the wait), ``signal`` (an
        ``asyncio.Event`` that gives up when set).
        """
        supervisor = _supervisor(self)
        options = supervisor.options
        assert options is not None
        wait = known_options(wait_options, WAIT_KEYS, "wait_options")
        target = port or wait.get("portToCheck") or options.default_port
        if target is None:
            raise ContainerError(
                "wait_for_port(): give portToCheck (the class has no default_port)"
            )
        budget_ms = None
        if wait.get("retries") is not None:
            budget_ms = wait["retries"] * wait.get(
                "waitInterval", options.readiness.wait_interval * 1000
            )
        await within(
            supervisor.ready(int(target)),
            budget_ms,
            wait.get("signal"),
            f"port {target} did not answer within {budget_ms} ms (retries x waitInterval)",
        )

    async def stop(self, signal: str | int = "SIGTERM") -> None:
        """Send ``signal`` (default SIGTERM) and return, as Cloudflare's ``stop``: nothing
        escalates to SIGKILL; ``destroy()`` kills. ``on_stop`` runs once it has ended."""
        await _supervisor(self).signal(signal_number(signal), reason="stop")

    async def destroy(self) -> None:
        """Kill the container now (SIGKILL) and wait until its end is recorded."""
        await _supervisor(self).destroy()

    async def pause(self) -> None:
        """Freeze the running container; the next request (or ``start``) thaws it."""
        await _supervisor(self).pause()

    async def get_state(self) -> State:
        """Cloudflare's shape: ``status``, ``lastChange`` (ms), ``exitCode``."""
        return _supervisor(self).state

    def renew_activity_timeout(self) -> None:
        _supervisor(self).renew()

    # Requests

    async def fetch(self, request: Request) -> Response:
        supervisor = _supervisor(self)
        options = supervisor.options
        assert options is not None
        port_header = request.headers.get(SWITCH_PORT_HEADER) or request.headers.get(
            CF_SWITCH_PORT_HEADER
        )
        if port_header is not None:
            request.headers.popall(SWITCH_PORT_HEADER, None)
            request.headers.popall(CF_SWITCH_PORT_HEADER, None)
            port = int(port_header) if port_header.isdigit() else -1
            declared = _reachable_ports(supervisor)
            if port not in declared:
                log.warning(
                    "%s: switch_port to %r, which the class does not declare (%s)",
                    supervisor,
                    port_header,
                    declared,
                )
                return Response(
                    f"Bad container port {port_header!r}: {type(self).__name__} declares "
                    f"or exposes {', '.join(map(str, declared)) or 'no ports'}\n",
                    status=400,
                )
            return await self.container_fetch(request, port=port)
        if options.default_port is None:
            return Response(
                f"{type(self).__name__} has no default_port: set default_port on the class, "
                "or route with switch_port(request, port)\n",
                status=500,
            )
        return await self.container_fetch(request, port=options.default_port)

    async def container_fetch(
        self,
        request: Request | str,
        port: int | None = None,
        *,
        method: str | None = None,
        headers: HeadersInit = None,
        body: Any = None,
    ) -> Response:
        """Send a request (or a URL, relative ones go to ``http://container``) to a port:
        one the class declares or the image EXPOSEs (another raises ``ContainerError``)."""
        if not isinstance(request, Request) or method or headers is not None or body is not None:
            request = Request(request, method=method, headers=headers, body=body)
        supervisor = _supervisor(self)
        options = supervisor.options
        assert options is not None
        port = port or options.default_port or next(iter(options.required_ports), None)
        if port is None:
            return Response("No port to send the request to\n", status=500)
        # The default port is always reachable: the common case costs no set building.
        if port != options.default_port and port not in (reachable := _reachable_ports(supervisor)):
            raise ContainerError(
                f"container_fetch(): port {port} is neither declared by "
                f"{type(self).__name__} (default_port, required_ports) nor exposed by its "
                f"image; reachable: {', '.join(map(str, reachable)) or 'none'}"
            )
        lease = supervisor.lease()
        # The lease is released exactly once: by the forwarder when the response body
        # ends or is closed, or here when anything (an error, a cancellation) comes first.
        try:
            try:
                host_port = await supervisor.ready(port)
            except DockyardError as exc:
                lease.release()
                return _start_failure(supervisor, exc)
            manager = supervisor.manager
            if request.is_websocket:
                return await forward_websocket(
                    manager.session,
                    host_port,
                    request,
                    on_message=supervisor.renew,
                    on_finished=lease.release,
                    on_lost=supervisor.lost,
                    own=supervisor.own,
                )
            began = time.perf_counter()
            response = await forward_http(
                manager.upstream,
                supervisor.target(port, host_port),
                request,
                on_finished=lease.release,
                on_lost=supervisor.lost,
            )
            if manager.on_container_request is not None:
                manager.on_container_request(supervisor.class_name, time.perf_counter() - began)
            return response
        except DockyardError as exc:
            lease.release()
            return _error_response(supervisor, exc)
        except BaseException:
            lease.release()
            raise

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
        supervisor = _supervisor(self)
        container_id = _running_id(supervisor, "exec")
        if supervisor.phase.value == "paused":
            await supervisor.start(None, StartOverrides())
        return await supervisor.manager.runtime.exec(
            container_id, cmd, env=env, workdir=workdir, user=user
        )

    def exec_stream(
        self,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> ExecProcess:
        """``async with container.exec_stream(cmd) as proc: async for stream, chunk in proc``."""
        supervisor = _supervisor(self)
        container_id = _running_id(supervisor, "exec_stream")
        if supervisor.phase.value == "paused":
            raise ContainerError(
                f"exec_stream: {supervisor} is paused; call start() to wake it first"
            )
        return supervisor.manager.runtime.exec_stream(
            container_id, cmd, env=env, workdir=workdir, user=user
        )

    # Schedules

    async def schedule(
        self, when: datetime | float | int, method_name: str, payload: Any = None
    ) -> ContainerSchedule:
        """Call ``method_name(payload, schedule)`` once at ``when`` (a datetime, or seconds
        from now); a method that takes one argument gets ``payload`` only."""
        method = getattr(self, method_name, None)
        if method_name.startswith("_") or not callable(method):
            raise ContainerError(
                f"schedule(): {type(self).__name__} has no public method {method_name!r}"
            )
        row = _schedules(self).add(when, method_name, payload)
        await self._dockyard_arm_alarm()
        return ContainerSchedule.of(row)

    async def get_schedule(self, schedule_id: str) -> ContainerSchedule | None:
        row = _schedules(self).get(schedule_id)
        return None if row is None else ContainerSchedule.of(row)

    async def list_schedules(self, callback: str | None = None) -> list[ContainerSchedule]:
        """Pending schedules, soonest first; given ``callback``, only those calling it."""
        rows = _schedules(self).all()
        return [ContainerSchedule.of(r) for r in rows if callback in (None, r.callback)]

    async def delete_schedule(self, schedule_id: str) -> bool:
        deleted = _schedules(self).delete(schedule_id)
        await self._dockyard_arm_alarm()
        return deleted

    async def delete_schedules(self, callback: str) -> int:
        """Delete every pending schedule that calls ``callback``; how many were."""
        table = _schedules(self)
        deleted = sum(table.delete(row.id) for row in table.all() if row.callback == callback)
        await self._dockyard_arm_alarm()
        return deleted

    # The alarm drives schedules (the supervisor keeps the sleep timer).

    async def alarm(self, info: Any) -> None:
        table = _schedules(self)
        for row in table.due(time.time()):
            try:
                method = getattr(self, row.callback)
                if takes_two(method):
                    result = method(row.payload, ContainerSchedule.of(row))
                else:
                    result = method(row.payload)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("%s: scheduled call %s failed", _supervisor(self), row.callback)
            finally:
                table.delete(row.id)
        await self._dockyard_arm_alarm()

    async def _dockyard_arm_alarm(self) -> None:
        next_time = _schedules(self).next_time()
        if next_time is not None:
            await self.ctx.storage.set_alarm(next_time * 1000)
        else:
            await self.ctx.storage.delete_alarm()

    # Egress control: each change applies to the next request the container sends, and is
    # kept in the object's storage (it outlives a restart, as Cloudflare's does).

    async def set_allowed_hosts(self, hosts: list[str]) -> None:
        """Replace the allowlist: only hosts matching it may be reached from now on."""
        await _change_egress(self, allowed_hosts=_host_list(hosts, "set_allowed_hosts"))

    async def set_denied_hosts(self, hosts: list[str]) -> None:
        """Replace the denylist: matching hosts are blocked whatever else allows them."""
        await _change_egress(self, denied_hosts=_host_list(hosts, "set_denied_hosts"))

    async def allow_host(self, host: str) -> None:
        """Add one host (or glob) to the allowlist (creating it: others are then denied)."""
        current = list(_supervisor(self).egress_rules.allowed_hosts or [])
        await _change_egress(self, allowed_hosts=_with(current, host, "allow_host"))

    async def deny_host(self, host: str) -> None:
        current = list(_supervisor(self).egress_rules.denied_hosts)
        await _change_egress(self, denied_hosts=_with(current, host, "deny_host"))

    async def remove_allowed_host(self, host: str) -> None:
        """Drop one entry; an allowlist left empty still denies everything."""
        current = _supervisor(self).egress_rules.allowed_hosts or ()
        await _change_egress(self, allowed_hosts=[h for h in current if h != host])

    async def remove_denied_host(self, host: str) -> None:
        current = _supervisor(self).egress_rules.denied_hosts
        await _change_egress(self, denied_hosts=[h for h in current if h != host])

    async def set_outbound_handler(self, method_name: str) -> None:
        """Make the method ``method_name`` the catch-all outbound handler."""
        await _change_egress(self, outbound=_method_name(self, method_name))

    async def set_outbound_by_host(self, host: str, method_name: str) -> None:
        """Answer requests to ``host`` (a glob) with the method ``method_name``."""
        by_host = dict(_stored_egress(self).get("outbound_by_host") or {})
        by_host[host] = _method_name(self, method_name)
        await _change_egress(self, outbound_by_host=by_host)

    async def set_outbound_by_hosts(self, handlers: Mapping[str, str]) -> None:
        """Replace every handler set at runtime by host (the class's own stay)."""
        by_host = {host: _method_name(self, name) for host, name in handlers.items()}
        await _change_egress(self, outbound_by_host=by_host)

    async def remove_outbound_by_host(self, host: str) -> None:
        """Drop a runtime handler for ``host``; the class's own, if any, applies again."""
        by_host = dict(_stored_egress(self).get("outbound_by_host") or {})
        by_host.pop(host, None)
        await _change_egress(self, outbound_by_host=by_host)

    # Cloudflare's names, so a class ported from TypeScript calls the same methods.
    setAllowedHosts = set_allowed_hosts
    setDeniedHosts = set_denied_hosts
    allowHost = allow_host
    denyHost = deny_host
    removeAllowedHost = remove_allowed_host
    removeDeniedHost = remove_denied_host
    setOutboundHandler = set_outbound_handler
    setOutboundByHost = set_outbound_by_host
    setOutboundByHosts = set_outbound_by_hosts
    removeOutboundByHost = remove_outbound_by_host
    startAndWaitForPorts = start_and_wait_for_ports
    waitForPort = wait_for_port
    getState = get_state
    renewActivityTimeout = renew_activity_timeout
    containerFetch = container_fetch
    getSchedule = get_schedule
    getSchedules = list_schedules
    deleteSchedule = delete_schedule
    deleteSchedules = delete_schedules

    # What the object host asks

    def _dockyard_keep_alive(self) -> bool:
        return _supervisor(self).busy

    async def _dockyard_close(self) -> None:
        # This instance is going (a reload of the worker, a reset): its container is not.
        # The supervisor stays with the node; the next instance attaches to it.
        _supervisor(self).detach(self)


def _supervisor(instance: Container) -> ContainerSupervisor:
    supervisor = instance.ctx.container
    assert isinstance(supervisor, ContainerSupervisor)
    return supervisor


def _schedules(instance: Container) -> ScheduleTable:
    """The object's schedule table, set up once per storage (not once per call)."""
    storage = instance.ctx.storage
    table = _TABLES.get(storage)
    if table is None:
        table = _TABLES[storage] = ScheduleTable(storage)
    return table


# Kept beside, not on, the user's instance or storage: neither namespace is ours.
_TABLES: weakref.WeakKeyDictionary[Any, ScheduleTable] = weakref.WeakKeyDictionary()


def _options(
    cls: type[Container], supervisor: ContainerSupervisor, egress: Mapping[str, Any]
) -> ContainerOptions:
    name = cls.__name__
    if cls.sleep_mode not in ("stop", "pause"):
        raise ContainerError(f"{name}.sleep_mode must be 'stop' or 'pause', got {cls.sleep_mode!r}")
    return ContainerOptions(
        class_name=supervisor.class_name,
        default_port=cls.default_port,
        required_ports=tuple(cls.required_ports),
        sleep_after=parse_duration(cls.sleep_after, where=f"{name}.sleep_after"),
        sleep_mode=cls.sleep_mode,
        stop_paused_after=parse_duration(cls.stop_paused_after, where=f"{name}.stop_paused_after"),
        env_vars=dict(cls.env_vars),
        entrypoint=tuple(cls.entrypoint) if cls.entrypoint is not None else None,
        enable_internet=cls.enable_internet,
        readiness=Readiness(
            cls.ping_endpoint, cls.port_timeout, cls.probe_timeout, cls.wait_interval
        ),
        start_timeout=cls.start_timeout,
        stop_timeout=(
            supervisor.manager.settings.stop_grace if cls.stop_timeout is None else cls.stop_timeout
        ),
        start_boost=cls.start_boost,
        cap_add=tuple(cls.cap_add),
        pids_limit=cls.pids_limit,
        read_only_root=cls.read_only_root,
        labels=tuple((str(k), str(v)) for k, v in cls.labels.items()),
        egress=_egress_rules(cls, egress, cls.enable_internet),
    )


def _egress_rules(
    cls: type[Container], overrides: Mapping[str, Any], enable_internet: bool
) -> EgressRules:
    """The class's rules (snake_case, or Cloudflare's camelCase names) with the runtime
    changes kept in ``overrides``."""
    allowed = cls.allowed_hosts
    if allowed is None:
        allowed = getattr(cls, "allowedHosts", None)
    denied = cls.denied_hosts or getattr(cls, "deniedHosts", None) or []
    by_host = dict(cls.outbound_by_host or getattr(cls, "outboundByHost", None) or {})
    catch_all: Handler | None = cls.outbound
    if inspect.isfunction(catch_all):
        catch_all = "outbound"  # a method of the class: called on the instance
    if "allowed_hosts" in overrides:
        allowed = overrides["allowed_hosts"]
    if "denied_hosts" in overrides:
        denied = overrides["denied_hosts"]
    if overrides.get("outbound"):
        catch_all = overrides["outbound"]
    by_host.update(overrides.get("outbound_by_host") or {})
    return EgressRules(
        enable_internet=enable_internet,
        allowed_hosts=None if allowed is None else tuple(_host_list(allowed, cls.__name__)),
        denied_hosts=tuple(_host_list(denied, cls.__name__)),
        outbound=catch_all,
        outbound_by_host=by_host,
    )


def _stored_egress(instance: Container) -> dict[str, Any]:
    return dict(instance.ctx.storage.internal.get(EGRESS_KEY) or {})


async def _change_egress(instance: Container, **changes: Any) -> None:
    overrides = {**_stored_egress(instance), **changes}
    instance.ctx.storage.internal.put(EGRESS_KEY, overrides)
    supervisor = _supervisor(instance)
    running = supervisor.egress_rules.enable_internet
    supervisor.set_egress_rules(_egress_rules(type(instance), overrides, running))


def _host_list(hosts: Any, where: str) -> list[str]:
    if isinstance(hosts, str) or not all(isinstance(h, str) for h in hosts):
        raise ContainerError(f"{where}: hosts must be a list of strings, got {hosts!r}")
    return list(hosts)


def _with(hosts: list[str], host: str, where: str) -> list[str]:
    if not isinstance(host, str) or not host:
        raise ContainerError(f"{where}: give a host name or glob, got {host!r}")
    return hosts if host in hosts else [*hosts, host]


def _method_name(instance: Container, name: str) -> str:
    if (
        not isinstance(name, str)
        or name.startswith("_")
        or not callable(getattr(instance, name, None))
    ):
        raise ContainerError(f"{type(instance).__name__} has no public method {name!r}")
    return name


async def _camel_hook(instance: Container, name: str, *args: Any) -> bool:
    """Call the subclass's hook under Cloudflare's name, if it has one. JavaScript lets a
    hook leave out what it does not use (the tutorial's ``onStop()``), so a hook ported as
    written gets only as many arguments as it takes."""
    hook = getattr(instance, name, None)
    if hook is None or not callable(hook):
        return False
    capacity = positional_capacity(hook)
    taken = len(args) if capacity is None else int(min(capacity, len(args)))
    result = hook(*args[:taken])
    if inspect.isawaitable(result):
        await result
    return True


def _reachable_ports(supervisor: ContainerSupervisor) -> list[int]:
    """The ports a request may go to: declared by the class or EXPOSEd by the image."""
    assert supervisor.options is not None
    exposed = supervisor.manager.image_entry(supervisor.class_name).exposed_ports
    return sorted({*supervisor.options.declared_ports, *exposed})


def _running_id(supervisor: ContainerSupervisor, what: str) -> str:
    if supervisor.info is None:
        raise ContainerError(f"{what}: {supervisor} is not running; call start() first")
    return supervisor.info.id


def _start_failure(supervisor: ContainerSupervisor, error: DockyardError) -> Response:
    if error.status in (429, 503):
        return _error_response(supervisor, error)
    return _error_response(supervisor, error, prefix="Failed to start container")


def _error_response(
    supervisor: ContainerSupervisor, error: DockyardError, prefix: str | None = None
) -> Response:
    """Clients get a short message and an error id; the log gets the details."""
    ident = error_id()
    log.warning("%s: error %s: %s", supervisor, ident, error)
    return error_response(
        error, ident, debug=supervisor.manager.settings.debug_errors, prefix=prefix
    )
