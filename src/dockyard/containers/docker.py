"""`ContainerRuntime` on the Docker Engine API (aiodocker).

This is the only module that sees aiodocker or aiohttp errors: `_engine_errors` turns
each of them into a `dockyard.errors.ContainerError` that says what to check.

Over 400 lines on purpose: it is the whole of one engine behind the four protocols of
runtime.py, and keeping it one module keeps that single translation point for errors.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import math
import os
import re
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError, DockerStreamError
from aiodocker.stream import Stream

from dockyard._closing import AsyncClosing
from dockyard.containers import egress, netns
from dockyard.containers.images import context_archive
from dockyard.containers.runtime import (
    ContainerEvent,
    ContainerInfo,
    ContainerSpec,
    ContainerStats,
    EngineInfo,
    ExecResult,
    ExitStatus,
    LogLine,
    RuntimeCapabilities,
)
from dockyard.errors import (
    ContainerError,
    ContainerGone,
    EngineUnavailable,
    ImageError,
    StartFailed,
)

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
NO_INTERNET_NETWORK = "dockyard-no-internet"
# How long a short call (inspect, list, signal, create, ...) may take before the engine
# counts as unavailable. Waits, stops, builds, logs and execs last as long as they must.
DEFAULT_REQUEST_TIMEOUT = 30.0
# How long a connection made inside a container may wait for the port to accept it.
CONNECT_SECONDS = 5.0
_MASQUERADE_OPTION = "com.docker.network.bridge.enable_ip_masquerade"
_ICC_OPTION = "com.docker.network.bridge.enable_icc"
_BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"

log = logging.getLogger("dockyard.containers")
_BUILD_TAIL_LINES = 20


class DockerRuntime(AsyncClosing):
    """A `ContainerRuntime` talking to the engine at `url`, else `DOCKER_HOST`, else the
    default socket.

    `enable_internet=False` attaches the container to `no_internet_network`, a bridge
    network created on first use with IP masquerading and inter-container traffic
    disabled: published ports keep working from loopback, but the container's packets
    never get NAT to the host's address, so nothing beyond the host answers. Where this
    process may (root, local engine), a firewall rule also refuses every packet the bridge
    would forward (see egress.py), so nothing leaves the host at all. The host's own
    addresses stay reachable from the container either way.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        no_internet_network: str = NO_INTERNET_NETWORK,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        self._url = url
        self._request_timeout = request_timeout
        self._no_internet_network = no_internet_network
        self._network_ready = False
        self._egress_firewall: bool | None = None
        self._docker: aiodocker.Docker | None = None
        self._disk_limit: bool | None = None

    @property
    def engine_address(self) -> str:
        return self._url or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET

    @property
    def local_engine(self) -> bool:
        """The engine runs on this machine (a unix socket): its PIDs, log files and
        network namespaces are this machine's."""
        return self.engine_address.startswith("unix://")

    @property
    def capabilities(self) -> RuntimeCapabilities:
        return RuntimeCapabilities(
            disk_limit=self._disk_limit,
            internet_isolation=True,
            egress_firewall=self._egress_firewall,
        )

    async def aclose(self) -> None:
        if self._docker is not None:
            docker, self._docker = self._docker, None
            await docker.close()

    def _client(self) -> aiodocker.Docker:
        # Created on first use, inside the running loop that owns its HTTP session.
        if self._docker is None:
            # Without a connect timeout a wedged engine would hang every call forever.
            timeout = aiohttp.ClientTimeout(sock_connect=10)
            try:
                self._docker = aiodocker.Docker(url=self._url, timeout=timeout)
            except (ValueError, DockerError) as exc:  # no usable DOCKER_HOST, bad context
                raise EngineUnavailable(
                    f"Cannot set up a client for the container engine: {exc}. Set DOCKER_HOST "
                    "or start the engine; `docker info` shows whether one answers.",
                    address=self.engine_address,
                ) from exc
        return self._docker

    @contextlib.contextmanager
    def _engine_errors(
        self, action: str, *, container_id: str | None = None, image: str | None = None
    ) -> Iterator[None]:
        """Translate every engine/transport error raised inside into a Dockyard error."""
        try:
            yield
        except ContainerError:
            raise
        except DockerStreamError as exc:
            raise ContainerError(f"Could not {action}: {exc.message}") from exc
        except DockerError as exc:
            self._raise_translated(action, exc.status, exc.message, container_id, image, exc)
        except (
            aiohttp.ClientConnectionError,
            # The engine's answer was cut mid-body (it went away while we read): an
            # outage, never a result.
            aiohttp.ClientPayloadError,
            ConnectionError,
            FileNotFoundError,
        ) as exc:
            self._raise_translated(action, 900, str(exc), container_id, image, exc)
        except aiohttp.ClientError as exc:
            raise ContainerError(f"Could not {action}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _short_call(
        self, action: str, *, container_id: str | None = None, image: str | None = None
    ) -> AsyncIterator[None]:
        """`_engine_errors` for a call that should answer at once: an engine that accepts
        the connection but never answers (wedged, overloaded) is unavailable too."""
        try:
            async with asyncio.timeout(self._request_timeout):
                with self._engine_errors(action, container_id=container_id, image=image):
                    yield
        except TimeoutError as exc:
            raise EngineUnavailable(
                f"Could not {action}: the container engine at {self.engine_address} did not "
                f"answer within {self._request_timeout:g} s. Check `docker info`; a wedged "
                "dockerd may need a restart.",
                address=self.engine_address,
            ) from exc

    def _raise_translated(
        self,
        action: str,
        status: int,
        message: str,
        container_id: str | None,
        image: str | None,
        exc: BaseException,
    ) -> NoReturn:
        if status == 900:  # aiodocker's code for "could not connect"
            # The address is in the message (for the log and the console) and in
            # `address`; clients only ever see the error's `public` text.
            raise EngineUnavailable(
                f"Could not {action}: no container engine answers at {self.engine_address} "
                f"({message}). Is dockerd running and is DOCKER_HOST right? "
                "Check with `docker info`.",
                address=self.engine_address,
            ) from exc
        if status == 404 and container_id is not None:
            raise ContainerGone(
                f"Could not {action}: container {container_id[:12]} no longer exists "
                f"on the engine ({message})"
            ) from exc
        if status == 404 and image is not None:
            raise ImageError(
                f"Could not {action}: image {image!r} is not present on the engine "
                f"({message}). Dockyard never pulls from a registry: build it or load it "
                "locally first."
            ) from exc
        raise ContainerError(
            f"Could not {action}: the engine answered {status}: {message}"
        ) from exc

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
        context_dir = Path(context_dir)
        archive, dockerfile_name = await asyncio.to_thread(
            context_archive, context_dir, Path(dockerfile)
        )
        tail: deque[str] = deque(maxlen=_BUILD_TAIL_LINES)
        step = ""
        image_id = ""
        pending = ""

        def emit(text: str) -> None:
            nonlocal pending, step
            pending += text
            *lines, pending = pending.split("\n")
            for line in lines:
                tail.append(line)
                if line.startswith("Step "):
                    step = line
                on_output(line)

        def flush() -> None:
            if pending:
                emit("\n")

        def failure(message: str) -> ImageError:
            flush()
            output = "\n".join(line for line in tail if line)
            where = f" at {step!r}" if step else ""
            return ImageError(
                f"Building {tag} from {dockerfile} failed{where}: {message.strip()}\n"
                f"Last build output:\n{output}"
            )

        chunks = self._client().images.build(
            fileobj=archive,
            encoding="identity",
            path_dockerfile=dockerfile_name,
            tag=tag,
            buildargs=dict(build_args),
            labels=dict(labels or {}),
            rm=True,
            forcerm=True,  # no intermediate containers left behind by a failed step
            stream=True,
        )
        try:
            with self._engine_errors(f"build {tag}"):
                try:
                    async for chunk in chunks:
                        if "stream" in chunk:
                            emit(chunk["stream"])
                        aux = chunk.get("aux")
                        if isinstance(aux, dict) and "ID" in aux:
                            image_id = aux["ID"]
                except DockerStreamError as exc:
                    # A failed step: the engine reports it in-band, after the step's output.
                    raise failure(exc.message) from exc
        except (EngineUnavailable, ImageError):
            raise
        except ContainerError as exc:
            raise failure(exc.message) from exc
        flush()
        if not image_id:
            async with self._short_call(f"inspect the image {tag} just built"):
                image_id = (await self._client().images.inspect(tag))["Id"]
        return image_id

    async def image_id(self, ref: str) -> str | None:
        async with self._short_call(f"inspect image {ref!r}"):
            try:
                found = await self._client().images.inspect(ref)
            except DockerError as exc:
                if exc.status == 404:
                    return None
                raise
        return str(found["Id"])

    async def exposed_ports(self, ref: str) -> tuple[int, ...]:
        async with self._short_call(f"inspect image {ref!r}"):
            found = await self._client().images.inspect(ref)
        exposed = (found.get("Config") or {}).get("ExposedPorts") or {}
        # Keys read "8080/tcp"; only TCP ports can be proxied to.
        ports = (key.partition("/") for key in exposed)
        return tuple(sorted(int(port) for port, _, proto in ports if proto in ("", "tcp")))

    # Registries (a node's deploys: the deploying side pushes, the node pulls by digest)

    async def push(
        self,
        ref: str,
        auth: Mapping[str, str] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> str:
        """Push the local image `ref` (``registry/repo:tag``; no tag means ``latest``) and
        return the manifest digest the registry stored (``sha256:…``).

        `auth` is the engine's credential object (``{"username", "password"}``); each
        progress message of the engine (``status``, ``id``, ``progressDetail``) goes to
        `on_progress`. Raises `ImageError` naming the registry when it cannot be reached,
        refuses the credentials or the push, or when the engine has no image `ref`;
        `EngineUnavailable` when the engine itself does not answer.
        """
        name, tag = _split_tag(ref)
        digest = ""
        with self._registry_errors("push", ref):
            chunks = self._client().images.push(
                name, tag=tag or "latest", auth=dict(auth) if auth else None, stream=True
            )
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for chunk in chunks:
                    aux = chunk.get("aux")
                    if isinstance(aux, dict) and str(aux.get("Digest", "")).startswith("sha256:"):
                        digest = str(aux["Digest"])
                    if on_progress is not None:
                        on_progress(chunk)
        if not digest:
            raise ImageError(
                f"Pushed {ref} to the registry at {_registry_of(ref)}, but the engine did not "
                "report the manifest digest"
            )
        return digest

    async def pull(
        self,
        ref: str,
        auth: Mapping[str, str] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> str:
        """Pull `ref` (``registry/repo@sha256:…`` as a node runs images, or ``:tag``) into
        the engine and return the local image id.

        Raises `ImageError` naming the registry when it cannot be reached, refuses the
        credentials, or has no such image or digest; `EngineUnavailable` when the engine
        itself does not answer.
        """
        with self._registry_errors("pull", ref):
            chunks = self._client().images.pull(ref, auth=dict(auth) if auth else None, stream=True)
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for chunk in chunks:
                    if on_progress is not None:
                        on_progress(chunk)
        found = await self.image_id(ref)
        if found is None:
            raise ImageError(
                f"Pulled {ref} from the registry at {_registry_of(ref)}, but the engine "
                "does not have it afterwards"
            )
        return found

    @contextlib.contextmanager
    def _registry_errors(self, verb: str, ref: str) -> Iterator[None]:
        """`_engine_errors` for a push or pull: what the registry said becomes an
        `ImageError` naming it; an engine that does not answer stays `EngineUnavailable`."""
        try:
            with self._engine_errors(f"{verb} {ref}"):
                try:
                    yield
                except DockerError as exc:
                    # 900 is aiodocker's "could not connect" to the engine: an outage.
                    if exc.status == 900:
                        raise
                    raise _registry_error(verb, ref, exc.status, exc.message) from exc
        except ValueError as exc:  # aiodocker refuses auth for a ref without a registry
            raise ImageError(f"Could not {verb} {ref}: {exc}") from exc

    async def tag(self, source: str, ref: str) -> None:
        """Give the local image `source` (a name or an id) the name `ref`
        (``registry/repo:tag``), as `push` needs. Raises `ImageError` when there is no
        `source`. (Added by the deploy client, which pushes what it built.)"""
        name, tag = _split_tag(ref)
        async with self._short_call(f"tag {source} as {ref}", image=source):
            await self._client().images.tag(source, name, tag=tag or "latest")

    async def untag(self, ref: str) -> None:
        """Remove the name `ref` (the image stays while another name or a container uses
        it); a no-op when there is no such name."""
        async with self._short_call(f"untag {ref}"):
            try:
                await self._client().images.delete(ref, noprune=True)
            except DockerError as exc:
                if exc.status not in (404, 409):  # gone already / still in use
                    raise

    # Containers

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        config = await self._create_config(spec)
        docker = self._client()
        disk_limited = False
        if spec.disk_mb is not None and self._disk_limit is not False:
            config["HostConfig"]["StorageOpt"] = {"size": f"{spec.disk_mb}M"}
            disk_limited = True
        async with self._short_call(f"create a container from {spec.image!r}", image=spec.image):
            try:
                container = await docker.containers.create(config, name=spec.name)
            except DockerError as exc:
                if not (disk_limited and "storage-opt" in exc.message.lower()):
                    if exc.status == 409:
                        raise StartFailed(
                            f"Could not create container {spec.name!r}: {exc.message}"
                        ) from exc
                    raise
                # The storage driver cannot limit disk size (overlay2 needs xfs with
                # pquota). Remember that and run without the limit rather than fail.
                self._disk_limit = False
                del config["HostConfig"]["StorageOpt"]
                container = await docker.containers.create(config, name=spec.name)
            else:
                if disk_limited:
                    self._disk_limit = True
        async with self._short_call(f"start the container from {spec.image!r}"):
            try:
                await container.start()
            except DockerError as exc:
                if exc.status == 900:
                    raise
                # A container that never ran is of no use to anyone; do not leave it behind.
                with contextlib.suppress(ContainerError):
                    await self.remove(container.id)
                raise StartFailed(
                    f"Container from {spec.image!r} failed to start: {exc.message}. "
                    "Check the entrypoint/command and that its executable exists in the image."
                ) from exc
        info = await self.inspect(container.id)
        if info is None:
            raise ContainerGone(f"Container {container.id[:12]} vanished right after start")
        return info

    async def _create_config(self, spec: ContainerSpec) -> dict[str, Any]:
        host: dict[str, Any] = {
            "PortBindings": {
                f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}] for port in spec.ports
            },
            "Init": spec.init,
            **_hardening(spec),
        }
        if spec.vcpu is not None:
            host["NanoCpus"] = int(spec.vcpu * 1e9)
        if spec.memory_mib is not None:
            host["Memory"] = host["MemorySwap"] = spec.memory_mib * 1024 * 1024
        if not spec.enable_internet:
            await self._ensure_no_internet_network()
            host["NetworkMode"] = self._no_internet_network
        config: dict[str, Any] = {
            "Image": spec.image,
            "Labels": dict(spec.labels),
            "Env": [f"{key}={value}" for key, value in spec.env.items()],
            "ExposedPorts": {f"{port}/tcp": {} for port in spec.ports},
            "HostConfig": host,
        }
        if spec.entrypoint is not None:
            config["Entrypoint"] = list(spec.entrypoint)
            config["Cmd"] = []
        return config

    async def _ensure_no_internet_network(self) -> None:
        if self._network_ready:
            return
        name = self._no_internet_network
        networks = self._client().networks
        async with self._short_call(f"set up the network {name!r}"):
            try:
                await networks.create(
                    {
                        "Name": name,
                        "Driver": "bridge",
                        "CheckDuplicate": True,
                        "Labels": {"dockyard.managed": "true"},
                        "Options": {_MASQUERADE_OPTION: "false", _ICC_OPTION: "false"},
                    }
                )
            except DockerError as exc:
                if exc.status != 409:  # another process created it first
                    raise
            network = await (await networks.get(name)).show()
        options = network.get("Options") or {}
        if options.get(_MASQUERADE_OPTION) != "false":
            raise StartFailed(
                f"Network {name!r} exists but masquerades traffic, so it would not cut "
                f"containers off from the internet. Remove it (`docker network rm {name}`) "
                "and Dockyard will recreate it."
            )
        self._egress_firewall = False
        if egress.can_manage_firewall(self.engine_address):
            self._egress_firewall = await egress.block_forwarding(_bridge_name(network))
        if not self._egress_firewall:
            log.warning(
                "Containers with enable_internet=False get no NAT, but no firewall rule "
                "stops their packets leaving the host (that needs Dockyard running as root "
                "beside a local engine with iptables)"
            )
        self._network_ready = True

    @property
    def egress_listeners(self) -> str | None:
        """See `EgressListeners`: entering a container's namespace needs root and the
        engine's processes in this process's /proc (a local engine)."""
        if not self.local_engine:
            return f"a local engine (this one is {self.engine_address})"
        if os.geteuid() != 0:
            return "Dockyard running as root"
        return None

    async def listen_in_container(self, container_id: str, port: int) -> socket.socket:
        container_id, pid = await self._main_process(container_id)
        return await netns.listen_in_namespace(pid, container_id, port)

    @property
    def namespace_connections(self) -> str | None:
        """See `NamespaceConnections`: the same needs as `egress_listeners`."""
        return self.egress_listeners

    async def connect_in_container(
        self, container_id: str, port: int, *, pid: int | None = None
    ) -> socket.socket:
        if pid is None:
            container_id, pid = await self._main_process(container_id)
        return await netns.connect_in_namespace(pid, container_id, port, CONNECT_SECONDS)

    async def _main_process(self, container_id: str) -> tuple[str, int]:
        """The container's full id and the PID of its main process (it must run)."""
        async with self._short_call("inspect a container", container_id=container_id):
            data = await self._client().containers.container(container_id).show()
        pid = int((data.get("State") or {}).get("Pid") or 0)
        if pid <= 0:
            raise ContainerError(f"container {container_id[:12]} is not running")
        return str(data.get("Id") or container_id), pid

    async def remove_no_internet_network(self) -> None:
        """Remove the no-internet network and its firewall rule; a no-op when absent.

        Raises `ContainerError` while containers are still attached to it.
        """
        name = self._no_internet_network
        networks = self._client().networks
        async with self._short_call(f"remove the network {name!r}"):
            try:
                network = await networks.get(name)
                details = await network.show()
            except DockerError as exc:
                if exc.status == 404:
                    return
                raise
            await network.delete()
        if egress.can_manage_firewall(self.engine_address):
            await egress.allow_forwarding(_bridge_name(details))
        self._network_ready = False
        self._egress_firewall = None

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        data = await self._inspect_raw(container_id)
        return None if data is None else _container_info(data, local=self.local_engine)

    async def _inspect_raw(self, container_id: str) -> Mapping[str, Any] | None:
        """The engine's whole answer about a container; None when there is none."""
        async with self._short_call("inspect a container", container_id=container_id):
            try:
                data: Mapping[str, Any] = (
                    await self._client().containers.container(container_id).show()
                )
            except DockerError as exc:
                if exc.status == 404:
                    return None
                raise
        return data

    async def log_file(self, container_id: str) -> str | None:
        """`LogFiles.log_file`: the engine's ``LogPath`` when the engine is local, the
        driver is json-file and this process may read the file."""
        if not self.local_engine:
            return None
        data = await self._inspect_raw(container_id)
        if data is None:
            return None
        driver = ((data.get("HostConfig") or {}).get("LogConfig") or {}).get("Type")
        path = data.get("LogPath")
        if driver != "json-file" or not isinstance(path, str) or not path:
            return None
        return path if os.access(path, os.R_OK) else None

    async def wait(self, container_id: str) -> ExitStatus:
        container = self._client().containers.container(container_id)
        with self._engine_errors("wait for a container", container_id=container_id):
            result = await container.wait(condition="not-running")
        code = result.get("StatusCode")
        if not isinstance(code, int):
            # Never make up an exit: the caller would take the container for stopped.
            error = (result.get("Error") or {}).get("Message") or f"answer {result!r}"
            raise ContainerError(f"The engine's wait for a container gave no exit code: {error}")
        # An outage here raises too: the exit code alone would lose an OOM kill.
        info = await self.inspect(container_id)
        oom_killed = info.oom_killed if info is not None else False
        return ExitStatus(exit_code=code, oom_killed=oom_killed)

    async def signal(self, container_id: str, sig: str | int) -> None:
        await self._kill(container_id, str(sig))

    async def kill(self, container_id: str) -> None:
        await self._kill(container_id, "SIGKILL")

    async def _kill(self, container_id: str, sig: str) -> None:
        container = self._client().containers.container(container_id)
        async with self._short_call(f"send {sig} to a container", container_id=container_id):
            try:
                await container.kill(signal=sig)
            except DockerError as exc:
                if exc.status == 409 and "is not running" in exc.message:
                    return
                raise

    async def pause(self, container_id: str) -> None:
        container = self._client().containers.container(container_id)
        async with self._short_call("pause a container", container_id=container_id):
            await container.pause()

    async def unpause(self, container_id: str) -> None:
        container = self._client().containers.container(container_id)
        async with self._short_call("unpause a container", container_id=container_id):
            await container.unpause()

    async def set_cpu_limit(self, container_id: str, vcpu: float) -> None:
        async with self._short_call("limit a container's CPU", container_id=container_id):
            await self._client()._query_json(
                f"containers/{container_id}/update",
                method="POST",
                data={"NanoCpus": int(vcpu * 1e9)},
            )

    async def stop(self, container_id: str, grace_period: float = 10.0) -> None:
        container = self._client().containers.container(container_id)
        with self._engine_errors("stop a container", container_id=container_id):
            # The engine takes whole seconds; never round a grace period down to zero.
            await container.stop(t=max(0, math.ceil(grace_period)))

    async def remove(self, container_id: str) -> None:
        container = self._client().containers.container(container_id)
        async with self._short_call("remove a container"):
            try:
                await container.delete(force=True, v=True)
            except DockerError as exc:
                # 404: already gone; 409: a removal is already in progress.
                if exc.status not in (404, 409):
                    raise

    async def exec(
        self,
        container_id: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> ExecResult:
        out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        async with self.exec_stream(container_id, cmd, env, workdir, user) as proc:
            async for stream, chunk in proc:
                out[stream].append(chunk)
            code = await proc.exit_code()
        return ExecResult(code, b"".join(out["stdout"]), b"".join(out["stderr"]))

    def exec_stream(
        self,
        container_id: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> DockerExecProcess:
        return DockerExecProcess(self, container_id, list(cmd), env, workdir, user)

    async def logs(
        self, container_id: str, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[str]:
        container = self._client().containers.container(container_id)
        params: dict[str, Any] = {"tail": "all" if tail is None else str(tail)}
        pending = ""
        with self._engine_errors("read container logs", container_id=container_id):
            if follow:
                chunks = container.log(stdout=True, stderr=True, follow=True, **params)
                async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                    async for text in chunks:
                        *lines, pending = (pending + text).split("\n")
                        for line in lines:
                            yield line
            else:
                text = "".join(await container.log(stdout=True, stderr=True, **params))
                *lines, pending = text.split("\n")
                for line in lines:
                    yield line
        if pending:
            yield pending

    # Observation (the node's engine watcher): events and log lines with stream and time

    async def events(
        self, labels: Mapping[str, str], since: float | None = None
    ) -> AsyncIterator[ContainerEvent]:
        filters = {
            "type": ["container"],
            "label": [f"{key}={value}" for key, value in labels.items()],
        }
        params = {"filters": json.dumps(filters)}
        if since is not None:
            # As in `log_lines`: a float may round past the engine's nanoseconds.
            params["since"] = f"{since - 0.001:.9f}"
        earliest = since if since is not None else 0.0
        with self._engine_errors("follow the engine's events"):
            async with self._client()._query("events", params=params) as response:
                try:
                    pending = b""
                    async for chunk in response.content.iter_any():
                        *complete, pending = (pending + chunk).split(b"\n")
                        for raw in complete:
                            if raw.strip():
                                event = self._container_event(json.loads(raw))
                                if event.time >= earliest:
                                    yield event
                finally:
                    response.close()
            # The stream has no end of its own: it ending means the engine went away.
            raise EngineUnavailable(
                f"The container engine at {self.engine_address} closed its event stream "
                "(restarting?). Check `docker info`.",
                address=self.engine_address,
            )

    @staticmethod
    def _container_event(data: Mapping[str, Any]) -> ContainerEvent:
        actor = data.get("Actor") or {}
        attributes = dict(actor.get("Attributes") or {})
        code = attributes.pop("exitCode", None)
        for engine_own in ("name", "image", "signal", "execID", "execDuration"):
            attributes.pop(engine_own, None)
        time_ns = data.get("timeNano") or int(data.get("time") or 0) * 1_000_000_000
        return ContainerEvent(
            action=str(data.get("Action") or data.get("status") or ""),
            container_id=str(actor.get("ID") or data.get("id") or ""),
            labels=attributes,
            time=int(time_ns) / 1e9,
            exit_code=int(code) if code is not None and str(code).lstrip("-").isdigit() else None,
        )

    async def log_lines(
        self,
        container_id: str,
        *,
        follow: bool,
        since: float | None = None,
        max_line_bytes: int = 64 * 1024,
    ) -> AsyncIterator[LogLine]:
        """`ContainerObservation.log_lines`, read off the engine's HTTP API directly
        (aiodocker's log reader drops which stream a line came from).

        The answer is a run of frames, each an 8-byte header (stream 1 or 2, three zero
        bytes, payload size as a big-endian u32) and one message the engine stored,
        ``<RFC 3339 time with 9 digits> <text>``. The engine cuts a line over 16 KiB into
        messages that share the line's time, only the last ending in a newline: they are
        joined here, up to `max_line_bytes`; a longer line comes out in pieces of that size.
        Dockyard starts no TTY containers, whose logs are not framed.
        """
        params = {"stdout": "1", "stderr": "1", "timestamps": "1", "follow": "1" if follow else "0"}
        if since is not None:
            # A float does not hold the engine's nanoseconds exactly: ask from a moment
            # earlier and drop what comes before `since` here.
            params["since"] = f"{since - 0.001:.9f}"
        earliest = since if since is not None else 0.0
        streams = {1: "stdout", 2: "stderr"}
        # stream -> (time of the line's first piece, its bytes so far)
        partial: dict[int, tuple[float, bytes]] = {}
        seconds: dict[bytes, int] = {}  # "YYYY-MM-DDTHH:MM:SS" -> Unix seconds
        buffer = b""

        def line_time(stamp: bytes) -> float:
            whole = seconds.get(stamp[:19])
            if whole is None:
                if len(seconds) > 4096:
                    seconds.clear()
                moment = datetime.fromisoformat(stamp[:19].decode() + "+00:00")
                whole = seconds[stamp[:19]] = int(moment.timestamp())
            if len(stamp) == 30 and stamp[29] == 90:  # ".123456789Z": the engine's format
                return whole + int(stamp[20:29]) * 1e-9
            # Any other zone or precision (not what the engine sends today).
            text = re.sub(r"(\.\d{6})\d+", r"\1", stamp.decode()).replace("Z", "+00:00")
            return datetime.fromisoformat(text).timestamp()

        def pieces(kind: int, stamp_time: float, data: bytes) -> Iterator[LogLine]:
            stream = streams.get(kind, "stdout")
            while len(data) > max_line_bytes:
                cut = max_line_bytes
                while cut > 0 and data[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
                    cut -= 1
                cut = cut or max_line_bytes
                yield LogLine(stamp_time, stream, data[:cut].decode("utf-8", "replace"))
                data = data[cut:]
            if data:
                partial[kind] = (stamp_time, data)

        def parse(buffer: bytes, lines: builtins.list[LogLine]) -> bytes:
            """Append the lines of every whole frame in `buffer`; return what is left."""
            size = len(buffer)
            at = 0
            while at + 8 <= size:
                end = at + 8 + int.from_bytes(buffer[at + 4 : at + 8], "big")
                if end > size:
                    break
                kind = buffer[at]
                space = buffer.find(b" ", at + 8, end)
                at, start = end, at + 8
                if space < 0:
                    continue
                whole = seconds.get(buffer[start : start + 19])
                if whole is not None and space - start == 30 and buffer[space - 1] == 90:
                    stamp_time = whole + int(buffer[start + 20 : start + 29]) * 1e-9
                else:
                    stamp_time = line_time(buffer[start:space])
                if stamp_time < earliest:
                    continue
                complete = buffer[end - 1] == 10
                text = buffer[space + 1 : end - 1 if complete else end]
                if kind in partial:
                    stamp_time, head = partial.pop(kind)
                    text = head + text
                if len(text) > max_line_bytes or not complete:
                    lines.extend(pieces(kind, stamp_time, text))
                    if not complete or kind not in partial:
                        continue
                    stamp_time, text = partial.pop(kind)
                stream = streams.get(kind, "stdout")
                lines.append(LogLine(stamp_time, stream, text.decode("utf-8", "replace")))
            return buffer[at:]

        with self._engine_errors("read container logs", container_id=container_id):
            path = f"containers/{container_id}/logs"
            async with self._client()._query(path, params=params) as response:
                try:
                    async for chunk in response.content.iter_any():
                        buffer = buffer + chunk if buffer else chunk
                        if buffer[0] > 2:
                            raise ContainerError(
                                f"The logs of container {container_id[:12]} are not framed "
                                "(a TTY container?): Dockyard cannot tell their streams apart"
                            )
                        lines: builtins.list[LogLine] = []
                        buffer = parse(buffer, lines)
                        for line in lines:
                            yield line
                finally:
                    response.close()
        for kind, (stamp_time, text) in sorted(partial.items()):
            # The stream ended in the middle of a line (its last, without a newline).
            yield LogLine(stamp_time, streams.get(kind, "stdout"), text.decode("utf-8", "replace"))

    async def list(self, labels: Mapping[str, str]) -> builtins.list[ContainerInfo]:
        filters = json.dumps({"label": [f"{key}={value}" for key, value in labels.items()]})
        async with self._short_call("list containers"):
            found = await self._client().containers.list(all=True, filters=filters)
        # Every inspect runs to its end before any error is raised: none is left behind.
        results = await asyncio.gather(
            *(self.inspect(container.id) for container in found), return_exceptions=True
        )
        infos: builtins.list[ContainerInfo] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            # A container removed between listing and inspecting is simply not there.
            if result is not None:
                infos.append(result)
        return infos

    async def engine_info(self) -> EngineInfo:
        async with self._short_call("read the engine's host information"):
            data = await self._client().system.info()
        security = " ".join(str(option) for option in data.get("SecurityOptions") or [])
        return EngineInfo(
            cpus=int(data.get("NCPU") or 0),
            memory_bytes=int(data.get("MemTotal") or 0),
            version=str(data.get("ServerVersion", "")),
            userns_remap="name=userns" in security,
        )

    async def stats(self, container_id: str) -> ContainerStats | None:
        """One reading of the container's counters (``one-shot``: no second sample for a
        CPU percentage); None when it is not running or gone."""
        async with self._short_call("read a container's stats", container_id=container_id):
            try:
                data = await self._client()._query_json(
                    f"containers/{container_id}/stats",
                    params={"stream": "false", "one-shot": "true"},
                )
            except DockerError as exc:
                if exc.status == 404:
                    return None
                raise
        if not isinstance(data, Mapping):
            return None  # seen from a container that stopped as it was read: no body
        return self._parse_stats(data)

    @staticmethod
    def _parse_stats(data: Mapping[str, Any]) -> ContainerStats | None:
        # A stopped container answers with empty counters and a zero read time.
        read = _timestamp(data.get("read"))
        cpu = ((data.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
        if read is None or not cpu:
            return None
        memory = data.get("memory_stats") or {}
        usage = int(memory.get("usage") or 0)
        details = memory.get("stats") or {}
        # As docker's CLI does: page cache the kernel can drop is not the container's use
        # (cgroup v1 names it total_inactive_file, v2 inactive_file; old engines: cache).
        for key in ("total_inactive_file", "inactive_file", "cache"):
            if key in details:
                if int(details[key]) < usage:
                    usage -= int(details[key])
                break
        networks = (data.get("networks") or {}).values()
        return ContainerStats(
            time=read.timestamp(),
            cpu_ns=int(cpu),
            memory_bytes=usage,
            rx_bytes=sum(int(net.get("rx_bytes") or 0) for net in networks),
            tx_bytes=sum(int(net.get("tx_bytes") or 0) for net in networks),
        )


class DockerExecProcess:
    """`ExecProcess` for `DockerRuntime.exec_stream`."""

    def __init__(
        self,
        runtime: DockerRuntime,
        container_id: str,
        cmd: builtins.list[str],
        env: Mapping[str, str] | None,
        workdir: str | None,
        user: str | None,
    ) -> None:
        self._runtime = runtime
        self._container_id = container_id
        self._cmd = cmd
        self._env = env
        self._workdir = workdir
        self._user = user
        self._exec: aiodocker.execs.Exec | None = None
        self._stream: Stream | None = None
        self._eof = False

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return self._runtime._engine_errors(action, container_id=self._container_id)

    async def __aenter__(self) -> Self:
        container = self._runtime._client().containers.container(self._container_id)
        with self._errors(f"run {self._cmd[:1]} in a container"):
            self._exec = await container.exec(
                self._cmd,
                stdout=True,
                stderr=True,
                environment=dict(self._env) if self._env is not None else None,
                workdir=self._workdir,
                user=self._user or "",
            )
            stream = self._exec.start(detach=False)
            await stream.__aenter__()
            self._stream = stream
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            await self._stream.close()

    def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        if self._stream is None:
            raise ContainerError("use `async with runtime.exec_stream(...)` first")
        with self._errors("read exec output"):
            while not self._eof:
                message = await self._stream.read_out()
                if message is None:
                    self._eof = True
                    break
                yield ("stderr" if message.stream == 2 else "stdout", message.data)

    async def exit_code(self) -> int:
        async for _ in self._chunks():
            pass
        assert self._exec is not None
        # The output ends when the process closes it; the engine records the exit code a
        # moment later, so poll the exec briefly (bounded).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        with self._errors("read an exec's exit code"):
            while True:
                data = await self._exec.inspect()
                if not data.get("Running") and data.get("ExitCode") is not None:
                    return int(data["ExitCode"])
                if loop.time() > deadline:
                    raise ContainerError(f"exec {self._cmd[:1]} never reported an exit code")
                await asyncio.sleep(0.01)


def _registry_of(ref: str) -> str:
    """The registry host of an image reference, as the engine reads it."""
    first, slash, _ = ref.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def _split_tag(ref: str) -> tuple[str, str | None]:
    """``registry:port/repo:tag`` -> (``registry:port/repo``, ``tag``); a digest stays."""
    if "@" in ref:
        return ref, None
    head, slash, last = ref.rpartition("/")
    name, colon, tag = last.partition(":")
    return (f"{head}{slash}{name}", tag) if colon else (ref, None)


def _registry_error(verb: str, ref: str, status: int, message: str) -> ImageError:
    registry = _registry_of(ref)
    text = message.strip()
    lowered = text.lower()
    if "does not exist locally" in lowered or "no such image" in lowered:
        why = "the engine has no image by that name; build or tag it first"
    elif re.search(r"connection refused|dial tcp|no such host|i/o timeout|\beof\b", lowered):
        why = f"the registry at {registry} cannot be reached"
    elif any(
        sign in lowered
        # The last: what the engine says when a registry wants a login it was not given.
        for sign in ("unauthorized", "denied", "authentication required", "no basic auth")
    ):
        why = f"the registry at {registry} refused the credentials"
    elif status == 404 or "manifest unknown" in lowered or "not found" in lowered:
        why = f"the registry at {registry} has no such image or digest"
    else:
        why = f"the registry at {registry} answered with an error"
    return ImageError(f"Could not {verb} {ref}: {why} ({text})")


def _bridge_name(network: Mapping[str, Any]) -> str:
    # The engine names a bridge br-<first 12 of the network id> unless told otherwise.
    options = network.get("Options") or {}
    return str(options.get(_BRIDGE_NAME_OPTION) or f"br-{network['Id'][:12]}")


def _hardening(spec: ContainerSpec) -> dict[str, Any]:
    """The HostConfig fields of the spec's hardening (see runtime.py's docstring)."""

    def names(caps: Sequence[str]) -> builtins.list[str]:
        return [cap.upper().removeprefix("CAP_") for cap in caps]

    added = names(spec.cap_add)
    host: dict[str, Any] = {
        # Asked for back wins over dropped: the engine would refuse the two together.
        "CapDrop": sorted(set(names(spec.cap_drop)) - set(added)),
        "CapAdd": sorted(set(added)),
        "SecurityOpt": ["no-new-privileges:true"] if spec.no_new_privileges else [],
        "ReadonlyRootfs": spec.read_only,
    }
    if spec.pids_limit is not None:
        host["PidsLimit"] = spec.pids_limit
    if spec.log_max_size_mib is not None:
        host["LogConfig"] = {
            "Type": "json-file",
            "Config": {
                "max-size": f"{spec.log_max_size_mib}m",
                "max-file": str(spec.log_max_files),
            },
        }
    if spec.read_only:
        host["Tmpfs"] = {"/tmp": f"rw,nosuid,nodev,mode=1777,size={spec.tmp_size_mib}m"}
    return host


def _container_info(data: Mapping[str, Any], *, local: bool) -> ContainerInfo:
    """``local``: the engine runs on this machine, so its PIDs are this /proc's."""
    state = data.get("State") or {}
    config = data.get("Config") or {}
    ports = (data.get("NetworkSettings") or {}).get("Ports") or {}
    host_ports: dict[int, int] = {}
    for key, bindings in ports.items():
        port, _, proto = key.partition("/")
        for binding in bindings or []:
            if (
                proto == "tcp"
                and binding.get("HostIp") in ("127.0.0.1", "")
                and binding.get("HostPort")
            ):
                host_ports[int(port)] = int(binding["HostPort"])
                break
    status = str(state.get("Status", "unknown"))
    running = bool(state.get("Running"))
    return ContainerInfo(
        id=data["Id"],
        name=str(data.get("Name", "")).lstrip("/"),
        image=str(config.get("Image", "")),
        labels=dict(config.get("Labels") or {}),
        status=status,
        running=running,
        exit_code=None if running or status == "created" else state.get("ExitCode"),
        oom_killed=bool(state.get("OOMKilled")),
        host_ports=host_ports,
        started_at=_timestamp(state.get("StartedAt")),
        finished_at=_timestamp(state.get("FinishedAt")),
        pid=(int(state.get("Pid") or 0) or None) if running and local else None,
    )


def _timestamp(value: str | None) -> datetime | None:
    # The engine uses "0001-01-01T00:00:00Z" for "never" and nanosecond precision,
    # which datetime cannot hold: cut to microseconds.
    if not value or value.startswith("0001-"):
        return None
    value = re.sub(r"(\.\d{6})\d+", r"\1", value).replace("Z", "+00:00")
    return datetime.fromisoformat(value)
