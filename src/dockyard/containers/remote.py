"""`ContainerRuntime` for an app process on a node, over the node's engine API.

An app process has no engine socket. Every container operation is an HTTP call to the
node (node/engine_api.py) on the app's own unix socket, and that socket is the app's
identity: the node applies its policy (allowed images, forced labels, only this app's
containers) before anything reaches the engine.

The wire format, shared with engine_api.py (which takes its codec from here):

    POST /v1/<method>   a JSON object of the arguments
    200                 the JSON result
    4xx/5xx             {"error": {"type": "ContainerGone", "message": "..."}}

`wait` is a long poll. `logs` and `exec_stream` answer a stream of JSON lines, opened
by {"started": true} once the node checked the call (and started the command):

    logs          {"line": str} ...                   then {"end": true}
    exec_stream   {"stdout" | "stderr": base64} ...   then {"exit_code": int}

and either stream may end with {"error": {...}} instead. A stream cut before its last
message means the node went away, which is `EngineUnavailable` (as is a socket that is
missing or refuses connections): the caller retries, as with an engine outage.

Over 400 lines: RemoteRuntime implements every protocol of runtime.py over the node's
API, method by method, and shares the wire's decoding (error_body, the type adapters)
with the node's side.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
from pydantic import TypeAdapter, ValidationError

from dockyard.containers.runtime import (
    ContainerInfo,
    ContainerSpec,
    EngineInfo,
    ExecResult,
    ExitStatus,
    RuntimeCapabilities,
)
from dockyard.errors import (
    ContainerError,
    ContainerGone,
    EngineUnavailable,
    ImageError,
    StartFailed,
)

from .._closing import AsyncClosing
from .egress_handoff import egress_socket_path, request_socket

__all__ = ["RemoteExecProcess", "RemoteRuntime"]

# A backstop against a node that accepts a call and never answers. The node bounds each
# engine call itself (30 s), and a `run` makes a few of them.
DEFAULT_REQUEST_TIMEOUT = 120.0
_CONNECT_TIMEOUT = 10.0
T = TypeVar("T")

# The codec, for both ends of the socket.
SPEC = TypeAdapter(ContainerSpec)
INFO = TypeAdapter(ContainerInfo)
INFO_OR_NONE = TypeAdapter(ContainerInfo | None)
INFOS = TypeAdapter(builtins.list[ContainerInfo])
EXIT = TypeAdapter(ExitStatus)
ENGINE = TypeAdapter(EngineInfo)
CAPABILITIES = TypeAdapter(RuntimeCapabilities)

# Errors cross the socket by type name; anything else arrives as a plain ContainerError.
ERROR_TYPES: dict[str, type[ContainerError]] = {
    cls.__name__: cls
    for cls in (ContainerError, EngineUnavailable, ImageError, StartFailed, ContainerGone)
}


def error_body(exc: ContainerError) -> dict[str, Any]:
    name = next(
        (cls.__name__ for cls in type(exc).__mro__ if cls.__name__ in ERROR_TYPES),
        "ContainerError",
    )
    return {"error": {"type": name, "message": exc.message}}


def error_from_body(body: Any, address: str) -> ContainerError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ContainerError(f"The node's engine API answered something unexpected: {body!r}")
    cls = ERROR_TYPES.get(str(error.get("type")), ContainerError)
    message = str(error.get("message", ""))
    if cls is EngineUnavailable:
        return EngineUnavailable(message, address=address)
    return cls(message)


def exec_result_body(result: ExecResult) -> dict[str, Any]:
    return {
        "exit_code": result.exit_code,
        "stdout": base64.b64encode(result.stdout).decode(),
        "stderr": base64.b64encode(result.stderr).decode(),
    }


class RemoteRuntime(AsyncClosing):
    """A `ContainerRuntime` (with `ImagePorts`) whose engine is the node behind
    `socket_path`. Images are never built here: `build_image` raises `ImageError`."""

    def __init__(
        self, socket_path: Path, *, request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    ) -> None:
        self.socket_path = Path(socket_path)
        self._request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        # What the node's engine could do, as of its last answer to `run`.
        self._capabilities = RuntimeCapabilities(disk_limit=None, internet_isolation=True)

    @property
    def capabilities(self) -> RuntimeCapabilities:
        return self._capabilities

    # EgressListeners: the node makes the socket and hands it over (egress_handoff.py).

    @property
    def egress_listeners(self) -> str | None:
        if egress_socket_path(self.socket_path).exists():
            return None
        return "a node that runs as root beside a local engine (this node offers no egress socket)"

    async def listen_in_container(self, container_id: str, port: int) -> socket.socket:
        path = egress_socket_path(self.socket_path)
        return await request_socket(path, container_id, port, error_from_body)

    # NamespaceConnections: the same socket, for connections (the request path).

    @property
    def namespace_connections(self) -> str | None:
        return self.egress_listeners

    async def connect_in_container(
        self, container_id: str, port: int, *, pid: int | None = None
    ) -> socket.socket:
        """``pid`` is ignored: the node looks the process up itself (and checks that the
        container is this app's)."""
        path = egress_socket_path(self.socket_path)
        return await request_socket(path, container_id, port, error_from_body, connect=True)

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # Transport

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop that owns it.
        if self._session is None:
            # No connection limit: every watched container keeps a `wait` open, and a
            # pool limit would queue short calls behind those long polls.
            connector = aiohttp.UnixConnector(path=str(self.socket_path), limit=0)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    @contextlib.contextmanager
    def _transport_errors(self, action: str) -> Iterator[None]:
        """Translate every transport error raised inside into a Dockyard error."""
        try:
            yield
        except ContainerError:
            raise
        except (
            aiohttp.ClientConnectionError,  # socket missing or refusing, node went away
            aiohttp.ClientPayloadError,  # an answer cut mid-body
            ConnectionError,
            TimeoutError,
        ) as exc:
            raise EngineUnavailable(
                f"Could not {action}: the node's engine API at {self.socket_path} is not "
                f"answering ({type(exc).__name__}: {exc}). The node may be restarting; "
                "retry shortly.",
                address=str(self.socket_path),
            ) from exc
        except (aiohttp.ClientError, ValueError) as exc:
            raise ContainerError(f"Could not {action}: {exc}") from exc

    async def _open(
        self, method: str, body: Mapping[str, Any], *, time_limit: float | None
    ) -> aiohttp.ClientResponse:
        """POST to the node; the response of a 200, else the error it carries, raised."""
        action = method.replace("_", " ")
        with self._transport_errors(action):
            resp = await self._client().post(
                f"http://node/v1/{method}",
                data=json.dumps(body),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=time_limit, sock_connect=_CONNECT_TIMEOUT),
            )
            if resp.status == 200:
                return resp
            try:
                raw = await resp.read()
            finally:
                resp.release()
            try:
                decoded = json.loads(raw)
            except ValueError:
                decoded = raw[:200]
            raise error_from_body(decoded, str(self.socket_path))

    async def _call(self, method: str, body: Mapping[str, Any], *, long: bool = False) -> Any:
        """A whole call, its decoded JSON result; `long` for calls that last as long as
        they must (wait, stop, exec)."""
        resp = await self._open(method, body, time_limit=None if long else self._request_timeout)
        try:
            with self._transport_errors(method.replace("_", " ")):
                return json.loads(await resp.read())
        finally:
            resp.release()

    async def _messages(
        self, resp: aiohttp.ClientResponse, action: str, last: str
    ) -> AsyncIterator[dict[str, Any]]:
        """The JSON lines of a stream, up to and including the one carrying `last`."""
        with self._transport_errors(action):
            while line := await resp.content.readline():
                message = json.loads(line)
                if "error" in message:
                    raise error_from_body(message, str(self.socket_path))
                yield message
                if last in message:
                    return
        raise EngineUnavailable(
            f"Could not {action}: the node's engine API at {self.socket_path} broke off "
            "the stream. The node may be restarting; retry shortly.",
            address=str(self.socket_path),
        )

    # Images

    async def build_image(
        self,
        context_dir: Path,
        dockerfile: Path,
        tag: str,
        build_args: Mapping[str, str],
        on_output: Callable[[str], None],
        labels: Mapping[str, str] | None = None,
    ) -> str:
        raise ImageError("images are built by dockyard deploy, not on the node")

    async def image_id(self, ref: str) -> str | None:
        found = await self._call("image_id", {"ref": ref})
        return None if found is None else str(found)

    async def exposed_ports(self, ref: str) -> tuple[int, ...]:
        ports = await self._call("exposed_ports", {"ref": ref})
        return tuple(int(port) for port in ports)

    # Containers

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        answer = await self._call("run", SPEC.dump_python(spec, mode="json"))
        self._capabilities = _decode(CAPABILITIES, answer.get("capabilities"))
        return _decode(INFO, answer.get("info"))

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        return _decode(INFO_OR_NONE, await self._call("inspect", {"container_id": container_id}))

    async def wait(self, container_id: str) -> ExitStatus:
        return _decode(EXIT, await self._call("wait", {"container_id": container_id}, long=True))

    async def signal(self, container_id: str, sig: str | int) -> None:
        await self._call("signal", {"container_id": container_id, "sig": sig})

    async def stop(self, container_id: str, grace_period: float = 10.0) -> None:
        body = {"container_id": container_id, "grace_period": grace_period}
        await self._call("stop", body, long=True)

    async def pause(self, container_id: str) -> None:
        await self._call("pause", {"container_id": container_id})

    async def unpause(self, container_id: str) -> None:
        await self._call("unpause", {"container_id": container_id})

    async def set_cpu_limit(self, container_id: str, vcpu: float) -> None:
        await self._call("set_cpu_limit", {"container_id": container_id, "vcpu": vcpu})

    async def kill(self, container_id: str) -> None:
        await self._call("kill", {"container_id": container_id})

    async def remove(self, container_id: str) -> None:
        await self._call("remove", {"container_id": container_id})

    async def list(self, labels: Mapping[str, str]) -> builtins.list[ContainerInfo]:
        return _decode(INFOS, await self._call("list", {"labels": dict(labels)}))

    async def engine_info(self) -> EngineInfo:
        return _decode(ENGINE, await self._call("engine_info", {}))

    # Exec and logs

    async def exec(
        self,
        container_id: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> ExecResult:
        body = _exec_body(container_id, cmd, env, workdir, user)
        answer = await self._call("exec", body, long=True)
        return ExecResult(
            int(answer["exit_code"]),
            base64.b64decode(answer["stdout"]),
            base64.b64decode(answer["stderr"]),
        )

    def exec_stream(
        self,
        container_id: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> RemoteExecProcess:
        return RemoteExecProcess(self, _exec_body(container_id, cmd, env, workdir, user))

    async def logs(
        self, container_id: str, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[str]:
        body = {"container_id": container_id, "follow": follow, "tail": tail}
        resp = await self._open("logs", body, time_limit=None)
        try:
            async for message in self._messages(resp, "read container logs", "end"):
                if "line" in message:
                    yield str(message["line"])
        finally:
            # Closing (not releasing) also ends a follow on the node's side.
            resp.close()


class RemoteExecProcess:
    """`ExecProcess` for `RemoteRuntime.exec_stream`."""

    def __init__(self, runtime: RemoteRuntime, body: dict[str, Any]) -> None:
        self._runtime = runtime
        self._body = body
        self._resp: aiohttp.ClientResponse | None = None
        self._messages: AsyncIterator[dict[str, Any]] | None = None
        self._exit_code: int | None = None

    async def __aenter__(self) -> Self:
        # The node starts the command before it answers: a container that is gone or
        # not running raises here, as with the engine itself.
        self._resp = await self._runtime._open("exec_stream", self._body, time_limit=None)
        self._messages = self._runtime._messages(self._resp, "read exec output", "exit_code")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._resp is not None:
            self._resp.close()

    def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        if self._messages is None:
            raise ContainerError("use `async with runtime.exec_stream(...)` first")
        async for message in self._messages:
            if "exit_code" in message:
                self._exit_code = int(message["exit_code"])
                return
            for stream in ("stdout", "stderr"):
                if stream in message:
                    yield stream, base64.b64decode(message[stream])

    async def exit_code(self) -> int:
        async for _ in self._chunks():
            pass
        if self._exit_code is None:
            raise ContainerError("the exec's output ended without an exit code")
        return self._exit_code


def _decode(adapter: TypeAdapter[T], value: Any) -> T:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise ContainerError(f"The node's engine API sent a malformed answer: {exc}") from exc


def _exec_body(
    container_id: str,
    cmd: Sequence[str],
    env: Mapping[str, str] | None,
    workdir: str | None,
    user: str | None,
) -> dict[str, Any]:
    return {
        "container_id": container_id,
        "cmd": list(cmd),
        "env": dict(env) if env is not None else None,
        "workdir": workdir,
        "user": user,
    }
