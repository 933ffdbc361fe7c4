"""The node's engine API: an app process's only way to its containers.

Each app gets its own unix socket (`run/<app>/engine.sock`, mode 0600, owned by the
app's uid), and the socket is the app's identity: whatever arrives on it acts for that
app and no other. `containers/remote.py` is the client and defines the wire format.

The policy, enforced here and nowhere else:
- `run` only with an image the app's versions name (`allowed_images()`, full run refs),
  with the labels `dockyard.app` and `dockyard.owner` set by the node; of the other
  `dockyard.*` labels an app may set only class, object_id, object_name and version.
  A name, when given, is put under the app's prefix (names are engine-wide).
- Resources capped to the engine host (vCPU, memory) and to the node's limits (process
  count, log size); `no_new_privileges` always on; `cap_add` only within the engine's
  default capability set (taking back what Dockyard drops, never more).
- Every per-container call only on containers carrying this app's app and owner labels.
  Anything else is treated exactly as a container that does not exist (`inspect` gives
  None, `remove` does nothing, the rest raise `ContainerGone` with the same message), so
  an app learns nothing about other apps' containers. Containers are named by their
  full id only (what `run` and `list` return): a name or an id prefix is "no such
  container".
- `list` always filtered by the forced labels; `build_image` has no route; `image_id`
  and `exposed_ports` answer only for allowed images.
- Beside the engine socket, `egress.sock` (containers/egress_handoff.py, served only when
  the node can enter containers' namespaces) hands the app a socket inside one of its
  own running containers: a listener for its egress proxy, or a connection to a port on
  the container's loopback for its requests; nothing else.

Over 400 lines: the request models, the per-app routes and the policy they all go
through (_own, _police, the forced labels) are one concern: an app's view of the engine.
Splitting the routes from the policy would let a route be added without it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dockyard.containers import labels
from dockyard.containers.egress_handoff import ListenServer, egress_socket_path
from dockyard.containers.remote import (
    CAPABILITIES,
    ENGINE,
    EXIT,
    INFO,
    INFO_OR_NONE,
    INFOS,
    SPEC,
    error_body,
    exec_result_body,
)
from dockyard.containers.runtime import (
    DEFAULT_LOG_MAX_FILES,
    DEFAULT_LOG_MAX_SIZE_MIB,
    ContainerInfo,
    ContainerRuntime,
    ContainerSpec,
    EgressListeners,
    EngineInfo,
    ImagePorts,
    NamespaceConnections,
)
from dockyard.errors import ContainerError, ContainerGone, ImageError, StartFailed

from .._closing import AsyncClosing

__all__ = ["EngineApi"]

log = logging.getLogger("dockyard.node.engine_api")

# Node limits until NodeSettings carries them (the lead wires them).
MAX_PIDS_LIMIT = 4096
MAX_LOG_SIZE_MIB = 100
MAX_LOG_FILES = 10
# How long closing an app's socket lets calls in flight finish; long polls (wait, logs)
# are cut after it, and their clients see the node go away (EngineUnavailable).
CLOSE_GRACE = 1.0

# VCPU is informative (CPU is metered from the cgroup); memory and disk sizes are billed,
# so the node writes those labels itself from the limits it enforces.
_APP_SETTABLE = frozenset(
    {labels.CLASS, labels.OBJECT, labels.NAME, labels.VERSION, labels.DEPLOY, labels.VCPU}
)
# The engine's default set: an app may take back what Dockyard drops, nothing beyond.
_ENGINE_DEFAULT_CAPS = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "NET_RAW",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
_MIB = 1024 * 1024
_FULL_ID = re.compile(r"[0-9a-f]{64}")


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Target(_Args):
    # An id, a prefix or a name; never anything that could walk the engine's URL space.
    container_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _Signal(_Target):
    sig: str | int = Field(union_mode="left_to_right")


class _Stop(_Target):
    grace_period: float = Field(default=10.0, ge=0, allow_inf_nan=False)


class _Cpu(_Target):
    vcpu: float = Field(gt=0, allow_inf_nan=False)


class _Exec(_Target):
    cmd: list[str] = Field(min_length=1)
    env: dict[str, str] | None = None
    workdir: str | None = None
    user: str | None = None


class _Logs(_Target):
    follow: bool = False
    tail: int | None = Field(default=None, ge=0)


class _Ref(_Args):
    ref: str


class _List(_Args):
    labels: dict[str, str]


class _NoArgs(_Args):
    pass


A = TypeVar("A", bound=_Args)


@dataclasses.dataclass
class _Served:
    runner: web.AppRunner
    socket_path: Path
    # The app's egress socket (egress_handoff.py), when this node can listen in containers.
    egress: ListenServer | None = None


class EngineApi(AsyncClosing):
    """Serves each app's engine socket over one `runtime`, for the node `owner`."""

    def __init__(
        self,
        runtime: ContainerRuntime,
        owner: str,
        *,
        before_stop: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """``before_stop(container_id)`` runs before a stop or kill goes to the engine
        (the meter takes its last reading of the container then)."""
        self.runtime = runtime
        self.owner = owner
        self.before_stop = before_stop
        self._served: dict[str, _Served] = {}
        self._host: EngineInfo | None = None

    async def open(
        self,
        app: str,
        socket_path: Path,
        allowed_images: Callable[[], set[str]],
        uid: int | None = None,
    ) -> None:
        """Serve `app` on `socket_path` (replacing a socket already served for it)."""
        await self.close(app)
        socket_path = Path(socket_path)
        engine = _AppEngine(self, app, allowed_images)
        runner = web.AppRunner(
            engine.web_app(),
            access_log=None,
            # A client that hangs up (a closed `logs` iterator) ends its handler too.
            handler_cancellation=True,
            shutdown_timeout=CLOSE_GRACE,
        )
        await runner.setup()
        try:
            # A socket file left by a previous node run would make the bind fail.
            socket_path.unlink(missing_ok=True)
            await web.UnixSite(runner, str(socket_path)).start()
            os.chmod(socket_path, 0o600)
            if uid is not None:
                os.chown(socket_path, uid, -1)
        except BaseException:
            await runner.cleanup()
            socket_path.unlink(missing_ok=True)
            raise
        served = self._served[app] = _Served(runner, socket_path)
        runtime = self.runtime
        if isinstance(runtime, EgressListeners) and runtime.egress_listeners is None:
            connects = (
                isinstance(runtime, NamespaceConnections) and runtime.namespace_connections is None
            )
            egress = ListenServer(
                egress_socket_path(socket_path),
                engine.listen_in_container,
                _egress_error,
                engine.connect_in_container if connects else None,
            )
            try:
                await egress.start(uid)
            except OSError as exc:
                # The app still runs; only its classes with egress rules fail to start.
                log.error("app %s: cannot serve its egress socket: %s", app, exc)
            else:
                served.egress = egress

    async def close(self, app: str) -> None:
        """Stop serving `app`; a no-op when it is not served."""
        served = self._served.pop(app, None)
        if served is None:
            return
        try:
            if served.egress is not None:
                await served.egress.aclose()
            await served.runner.cleanup()
        finally:
            served.socket_path.unlink(missing_ok=True)

    async def aclose(self) -> None:
        for app in list(self._served):
            await self.close(app)

    async def host(self) -> EngineInfo:
        """The engine host's CPUs and memory (asked once)."""
        if self._host is None:
            self._host = await self.runtime.engine_info()
        return self._host


class _AppEngine:
    """The routes of one app's socket, with that app's policy."""

    def __init__(self, api: EngineApi, app: str, allowed_images: Callable[[], set[str]]) -> None:
        self.api = api
        self.runtime = api.runtime
        self.app = app
        self.allowed_images = allowed_images
        self.forced = {labels.APP: app, labels.OWNER: api.owner}

    def web_app(self) -> web.Application:
        web_app = web.Application()
        routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            "engine_info": self._route(_NoArgs, self.engine_info),
            "capabilities": self._route(_NoArgs, self.capabilities),
            "image_id": self._route(_Ref, self.image_id),
            "exposed_ports": self._route(_Ref, self.exposed_ports),
            "run": self._run_route,
            "inspect": self._route(_Target, self.inspect),
            "wait": self._route(_Target, self.wait),
            "signal": self._route(_Signal, self.signal),
            "stop": self._route(_Stop, self.stop),
            "pause": self._route(_Target, self.pause),
            "unpause": self._route(_Target, self.unpause),
            "set_cpu_limit": self._route(_Cpu, self.set_cpu_limit),
            "kill": self._route(_Target, self.kill),
            "remove": self._route(_Target, self.remove),
            "list": self._route(_List, self.list),
            "exec": self._route(_Exec, self.exec),
            "exec_stream": self.exec_stream,
            "logs": self.logs,
        }
        web_app.add_routes([web.post(f"/v1/{name}", handler) for name, handler in routes.items()])
        return web_app

    def _route(
        self, model: type[A], call: Callable[[A], Awaitable[Any]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                args = model.model_validate_json(await request.read())
                result = await call(args)
            except Exception as exc:
                return _error_response(request, exc)
            return web.json_response(result)

        return handle

    # Policy

    def _mine(self, info: ContainerInfo) -> bool:
        return all(info.labels.get(key) == value for key, value in self.forced.items())

    async def _find(self, container_id: str) -> ContainerInfo | None:
        """The container if it exists and is this app's; None for anything else.

        Only full ids: a name or a prefix could be ambiguous, and the engine's answer to
        an ambiguous one would tell that other containers exist."""
        if not _FULL_ID.fullmatch(container_id):
            return None
        info = await self.runtime.inspect(container_id)
        return info if info is not None and self._mine(info) else None

    async def _own(self, args: _Target, action: str) -> ContainerInfo:
        info = await self._find(args.container_id)
        if info is None:
            # The same words whether it does not exist or belongs to someone else.
            raise ContainerGone(
                f"Could not {action}: container {args.container_id[:12]} does not exist"
            )
        return info

    async def _own_port(self, container_id: str, port: int, action: str) -> ContainerInfo:
        """The app's own container, for a socket on ``port`` inside it."""
        if not 1 <= port <= 65535:
            raise ContainerError(f"port {port} is not a TCP port")
        return await self._own(_Target(container_id=container_id), action)

    async def listen_in_container(self, container_id: str, port: int) -> socket.socket:
        """A listening socket inside one of this app's running containers (egress)."""
        info = await self._own_port(container_id, port, "listen in a container")
        assert isinstance(self.runtime, EgressListeners)
        return await self.runtime.listen_in_container(info.id, port)

    async def connect_in_container(self, container_id: str, port: int) -> socket.socket:
        """A connection to a port on the loopback of one of this app's running containers
        (the request path, past the engine's userland proxy)."""
        info = await self._own_port(container_id, port, "connect in a container")
        assert isinstance(self.runtime, NamespaceConnections)
        try:
            return await self.runtime.connect_in_container(info.id, port, pid=info.pid)
        except OSError as exc:
            # Nothing listens there (a server on the container's external address only):
            # an answer, not a node failure; the app then uses the published port.
            raise ContainerError(
                f"nothing accepts connections on port {port} inside container "
                f"{info.id[:12]}: {exc.strerror or exc}"
            ) from exc

    def _check_image(self, ref: str) -> bool:
        return ref in self.allowed_images()

    def _not_deployed(self, ref: str) -> ImageError:
        return ImageError(
            f"Image {ref!r} is not one of the images app {self.app!r} deployed; a node "
            "runs only the images its versions name (by digest)"
        )

    async def _police(self, spec: ContainerSpec) -> ContainerSpec:
        if not self._check_image(spec.image):
            raise self._not_deployed(spec.image)
        for key, value in spec.labels.items():
            if key in self.forced and value != self.forced[key]:
                raise StartFailed(f"Label {key!r} is refused: the node sets it to this app's value")
            if key.startswith(labels.RESERVED_PREFIX) and key not in (
                *self.forced,
                *_APP_SETTABLE,
                labels.MEMORY_MIB,
                labels.DISK_MB,
            ):
                raise StartFailed(f"Label {key!r} is reserved to the node")
        extra_caps = {cap.upper().removeprefix("CAP_") for cap in spec.cap_add}
        extra_caps -= _ENGINE_DEFAULT_CAPS
        if extra_caps:
            raise StartFailed(
                f"Capabilities {', '.join(sorted(extra_caps))} are refused on this node: "
                "a container may only keep the engine's default set"
            )
        host = await self.api.host()
        vcpu = spec.vcpu
        if vcpu is not None:
            if not (math.isfinite(vcpu) and vcpu > 0):
                raise StartFailed(f"vcpu must be a positive number, not {vcpu!r}")
            vcpu = min(vcpu, float(host.cpus)) if host.cpus else vcpu
        memory = spec.memory_mib
        if memory is not None and host.memory_bytes:
            memory = min(memory, host.memory_bytes // _MIB)
        pids = spec.pids_limit
        # None, 0 and negative values all mean "no limit" to the engine.
        if pids is None or pids <= 0 or pids > MAX_PIDS_LIMIT:
            pids = MAX_PIDS_LIMIT
        name = spec.name
        # App names have no "_", so "<app>_" prefixes never collide between apps.
        if name is not None and not name.startswith(f"{self.app}_"):
            name = f"{self.app}_{name}"
        sizes = {
            labels.MEMORY_MIB: str(memory or host.memory_bytes // _MIB),
            labels.DISK_MB: str(spec.disk_mb or 0),
        }
        return dataclasses.replace(
            spec,
            labels={**spec.labels, **self.forced, **sizes},
            vcpu=vcpu,
            memory_mib=memory,
            pids_limit=pids,
            name=name,
            no_new_privileges=True,
            log_max_size_mib=min(
                spec.log_max_size_mib or DEFAULT_LOG_MAX_SIZE_MIB, MAX_LOG_SIZE_MIB
            ),
            log_max_files=max(1, min(spec.log_max_files or DEFAULT_LOG_MAX_FILES, MAX_LOG_FILES)),
        )

    # Routes

    async def engine_info(self, args: _NoArgs) -> Any:
        return ENGINE.dump_python(await self.runtime.engine_info(), mode="json")

    async def capabilities(self, args: _NoArgs) -> Any:
        return CAPABILITIES.dump_python(self.runtime.capabilities, mode="json")

    async def image_id(self, args: _Ref) -> str | None:
        if not self._check_image(args.ref):
            return None  # as if the engine did not have it
        return await self.runtime.image_id(args.ref)

    async def exposed_ports(self, args: _Ref) -> list[int]:
        if not self._check_image(args.ref):
            raise self._not_deployed(args.ref)
        if not isinstance(self.runtime, ImagePorts):
            return []
        return list(await self.runtime.exposed_ports(args.ref))

    async def _run_route(self, request: web.Request) -> web.StreamResponse:
        try:
            info = await self.runtime.run(await self._police(_spec(await request.read())))
        except Exception as exc:
            return _error_response(request, exc)
        return web.json_response(
            {
                "info": INFO.dump_python(info, mode="json"),
                "capabilities": CAPABILITIES.dump_python(self.runtime.capabilities, mode="json"),
            }
        )

    async def inspect(self, args: _Target) -> Any:
        return INFO_OR_NONE.dump_python(await self._find(args.container_id), mode="json")

    async def wait(self, args: _Target) -> Any:
        info = await self._own(args, "wait for a container")
        return EXIT.dump_python(await self.runtime.wait(info.id), mode="json")

    async def signal(self, args: _Signal) -> None:
        info = await self._own(args, f"send {args.sig} to a container")
        await self.runtime.signal(info.id, args.sig)

    async def stop(self, args: _Stop) -> None:
        info = await self._own(args, "stop a container")
        await self._before_stop(info.id)
        await self.runtime.stop(info.id, args.grace_period)

    async def _before_stop(self, container_id: str) -> None:
        hook = self.api.before_stop
        if hook is None:
            return
        try:
            await asyncio.wait_for(hook(container_id), 2.0)
        except Exception as exc:  # a reading lost is no reason to refuse a stop
            log.warning("Before stopping %s: %s", container_id[:12], exc)

    async def pause(self, args: _Target) -> None:
        await self.runtime.pause((await self._own(args, "pause a container")).id)

    async def unpause(self, args: _Target) -> None:
        await self.runtime.unpause((await self._own(args, "unpause a container")).id)

    async def set_cpu_limit(self, args: _Cpu) -> None:
        info = await self._own(args, "limit a container's CPU")
        host = await self.api.host()
        vcpu = min(args.vcpu, float(host.cpus)) if host.cpus else args.vcpu
        await self.runtime.set_cpu_limit(info.id, vcpu)

    async def kill(self, args: _Target) -> None:
        info = await self._own(args, "kill a container")
        await self._before_stop(info.id)
        await self.runtime.kill(info.id)

    async def remove(self, args: _Target) -> None:
        info = await self._find(args.container_id)
        if info is not None:  # else a no-op, as for a container already gone
            await self.runtime.remove(info.id)

    async def list(self, args: _List) -> Any:
        if any(args.labels.get(key, value) != value for key, value in self.forced.items()):
            return []  # nothing of this app carries another app's or owner's label
        found = await self.runtime.list({**args.labels, **self.forced})
        return INFOS.dump_python([info for info in found if self._mine(info)], mode="json")

    async def exec(self, args: _Exec) -> Any:
        info = await self._own(args, f"run {args.cmd[:1]} in a container")
        result = await self.runtime.exec(info.id, args.cmd, args.env, args.workdir, args.user)
        return exec_result_body(result)

    async def exec_stream(self, request: web.Request) -> web.StreamResponse:
        return await _stream(request, self._exec_messages(await request.read()))

    async def _exec_messages(self, raw: bytes) -> AsyncGenerator[dict[str, Any], None]:
        args = _Exec.model_validate_json(raw)
        info = await self._own(args, f"run {args.cmd[:1]} in a container")
        async with self.runtime.exec_stream(
            info.id, args.cmd, args.env, args.workdir, args.user
        ) as proc:
            yield {"started": True}
            async for stream, chunk in proc:
                yield {stream: base64.b64encode(chunk).decode()}
            yield {"exit_code": await proc.exit_code()}

    async def logs(self, request: web.Request) -> web.StreamResponse:
        return await _stream(request, self._log_messages(await request.read()))

    async def _log_messages(self, raw: bytes) -> AsyncGenerator[dict[str, Any], None]:
        args = _Logs.model_validate_json(raw)
        info = await self._own(args, "read container logs")
        yield {"started": True}
        lines = self.runtime.logs(info.id, follow=args.follow, tail=args.tail)
        try:
            async for line in lines:
                yield {"line": line}
        finally:
            # Closed at once, not when collected: a follow holds an engine stream.
            await lines.aclose()  # type: ignore[attr-defined]
        yield {"end": True}


async def _stream(
    request: web.Request, messages: AsyncGenerator[dict[str, Any], None]
) -> web.StreamResponse:
    """Answer `messages` as JSON lines. What fails before the first message (the checks,
    starting an exec) is an ordinary error answer; after it, an error line ends the
    stream."""
    response: web.StreamResponse | None = None
    try:
        async with contextlib.aclosing(messages):
            async for message in messages:
                if response is None:
                    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                    await response.prepare(request)
                await response.write(json.dumps(message).encode() + b"\n")
    except ConnectionResetError:
        pass  # the client went away: nobody left to tell
    except Exception as exc:
        status, error = _as_container_error(request, exc)
        if response is None:
            return web.json_response(error_body(error), status=status)
        with contextlib.suppress(ConnectionResetError):
            await response.write(json.dumps(error_body(error)).encode() + b"\n")
    return response if response is not None else web.Response()


def _spec(raw: bytes) -> ContainerSpec:
    # A field this node does not know is refused, never dropped without a word.
    try:
        fields = json.loads(raw)
    except ValueError:
        fields = None
    if isinstance(fields, dict):
        unknown = set(fields) - {field.name for field in dataclasses.fields(ContainerSpec)}
        if unknown:
            raise _BadRequest(f"unknown fields {', '.join(sorted(unknown))}")
    return SPEC.validate_json(raw, strict=True)


class _BadRequest(ContainerError):
    status = 400


def _as_container_error(request: web.Request, exc: Exception) -> tuple[int, ContainerError]:
    if isinstance(exc, _BadRequest):
        return 400, ContainerError(f"Bad request to {request.path}: {exc.message}")
    if isinstance(exc, ContainerError):
        return exc.status, exc
    if isinstance(exc, ValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
        where = ".".join(str(part) for part in first["loc"])
        return 400, ContainerError(f"Bad request to {request.path}: {where}: {first['msg']}")
    log.exception("Engine API call %s failed", request.path)
    return 500, ContainerError("The node's engine API failed on this call; see the node's log")


def _egress_error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, ValidationError):
        exc = ContainerError(f"bad request: {exc.error_count()} invalid field(s)")
    elif not isinstance(exc, ContainerError):
        log.error("egress listener failed", exc_info=exc)
        exc = ContainerError("the node could not make the listener")
    return error_body(exc)


def _error_response(request: web.Request, exc: Exception) -> web.Response:
    status, error = _as_container_error(request, exc)
    return web.json_response(error_body(error), status=status)
