"""The interface Dockyard uses to talk to a container engine, split by concern.

Everything above this module (the supervisor, the CLI, the platform) sees only these
dataclasses and the protocols below; `docker.py` implements them on the Docker Engine
API, and tests may pass a small fake that implements only the concern it needs:

    ImageStore           build_image, image_id
    ImagePorts           exposed_ports (optional: a runtime without it exposes nothing)
    ImagePuller          pull (optional: a runtime without it pulls nothing)
    EgressListeners      listen_in_container (optional: egress control needs it)
    NamespaceConnections connect_in_container (optional: without it, requests to a
                         container go to its published port)
    ContainerLifecycle   run, inspect, wait, signal, stop, pause, unpause, set_cpu_limit,
                         kill, remove, list, engine_info
    ContainerExec        exec, exec_stream
    ContainerLogs        logs
    ContainerRuntime     all four, plus capabilities and aclose (what the node holds)

Implementations raise only `dockyard.errors.ContainerError` and its subclasses.

Engine outages. An engine that cannot be reached (socket gone, connection refused or
cut mid-answer) is `EngineUnavailable`, from every method, and is never taken for a
container's state: `inspect` returns None and `wait` raises `ContainerGone` only when the
engine itself said the container does not exist; `wait` returns only an exit status the
engine reported; `list` never answers "no containers" for "no engine". A caller that sees
`EngineUnavailable` knows nothing about its containers and should retry with back-off.

Hardening. Every container runs with these defaults (fields of `ContainerSpec`, each
overridable per spec):
- `no_new_privileges`: setuid binaries cannot raise a process's privileges.
- `cap_drop`: `DEFAULT_CAP_DROP` on top of the engine's default set. What stays is what a
  web server and its entrypoint use: binding ports below 1024 (NET_BIND_SERVICE), dropping
  to another user (SETUID, SETGID), chown/chmod of its own files (CHOWN, DAC_OVERRIDE,
  FOWNER, FSETID) and signalling its children (KILL). Dropped: NET_RAW (raw sockets:
  ARP/ICMP spoofing of neighbours), MKNOD (device nodes), AUDIT_WRITE, SETFCAP and SETPCAP
  (granting file or process capabilities), SYS_CHROOT. A class that needs one back names
  it in `cap_add` (e.g. ``cap_add=("NET_RAW",)`` for ping); `cap_add` wins over `cap_drop`.
- `pids_limit`: a fork bomb stops at this many processes (the platform passes one per
  instance type).
- `log_max_size_mib` x `log_max_files`: the engine's json-file log driver rotates, so a
  chatty container cannot fill the host's disk (10 MiB x 3 by default).
- `read_only` (off by default): a read-only root filesystem, with a writable tmpfs on
  /tmp of `tmp_size_mib` (counted against the container's memory limit).
- User namespace remapping is an engine-wide setting, not a per-container one: root in a
  container is then an unprivileged uid on the host. Enable it in
  /etc/docker/daemon.json with ``{"userns-remap": "default"}`` and restart dockerd (the
  engine creates the `dockremap` user and needs entries in /etc/subuid and /etc/subgid;
  images are stored separately per mapping, so they are rebuilt once).
  `engine_info().userns_remap` tells whether the engine runs with it.

Over 400 lines: it is the engine seam: the data classes and every protocol a runtime may
implement, each short; the module table at the top is the index. Splitting it would
scatter the one interface a cluster backend must implement.
"""

from __future__ import annotations

import builtins
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

__all__ = [
    "DEFAULT_CAP_DROP",
    "DEFAULT_LOG_MAX_FILES",
    "DEFAULT_LOG_MAX_SIZE_MIB",
    "DEFAULT_PIDS_LIMIT",
    "DEFAULT_TMP_SIZE_MIB",
    "ContainerEvent",
    "ContainerExec",
    "ContainerInfo",
    "ContainerLifecycle",
    "ContainerLogs",
    "ContainerObservation",
    "ContainerRuntime",
    "ContainerSpec",
    "ContainerStats",
    "EgressListeners",
    "EngineInfo",
    "ExecProcess",
    "ExecResult",
    "ExitStatus",
    "ImagePorts",
    "ImagePuller",
    "ImageStore",
    "LogFiles",
    "LogLine",
    "NamespaceConnections",
    "RuntimeCapabilities",
]

# Capabilities removed from the engine's default set (see the module docstring for why
# these, and for what stays).
DEFAULT_CAP_DROP: tuple[str, ...] = (
    "AUDIT_WRITE",
    "MKNOD",
    "NET_RAW",
    "SETFCAP",
    "SETPCAP",
    "SYS_CHROOT",
)
DEFAULT_PIDS_LIMIT = 512
DEFAULT_LOG_MAX_SIZE_MIB = 10
DEFAULT_LOG_MAX_FILES = 3
DEFAULT_TMP_SIZE_MIB = 64


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """What to run. Ports are published on 127.0.0.1 only, on ephemeral host ports."""

    image: str
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    # Replaces both the image's ENTRYPOINT and CMD; None keeps the image's own.
    entrypoint: Sequence[str] | None = None
    ports: Sequence[int] = ()
    vcpu: float | None = None
    # Memory limit with swap disabled.
    memory_mib: int | None = None
    # Writable-layer size; applied only where the engine's storage driver supports it
    # (see `RuntimeCapabilities.disk_limit`).
    disk_mb: int | None = None
    # False cuts the container off from the outside world while keeping its published
    # ports reachable from loopback; see the implementation for how far that goes.
    enable_internet: bool = True
    name: str | None = None
    # Run a tiny init as PID 1 that forwards signals and reaps zombies, so SIGTERM stops
    # servers that install no handler of their own (PID 1 ignores unhandled signals).
    init: bool = True
    # Hardening (module docstring): each default is what a web server needs, no more.
    no_new_privileges: bool = True
    # Capability names without the CAP_ prefix, as the engine spells them.
    cap_drop: Sequence[str] = DEFAULT_CAP_DROP
    cap_add: Sequence[str] = ()
    # None: no limit on the number of processes.
    pids_limit: int | None = DEFAULT_PIDS_LIMIT
    # None: the engine's own log settings (no rotation with json-file's defaults).
    log_max_size_mib: int | None = DEFAULT_LOG_MAX_SIZE_MIB
    log_max_files: int = DEFAULT_LOG_MAX_FILES
    read_only: bool = False
    # Size of the tmpfs on /tmp that a read-only container gets.
    tmp_size_mib: int = DEFAULT_TMP_SIZE_MIB


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    id: str
    name: str
    image: str
    labels: Mapping[str, str]
    # The engine's state: "created", "running", "paused", "restarting", "exited", "dead".
    status: str
    running: bool
    exit_code: int | None
    oom_killed: bool
    # container port -> host port on 127.0.0.1
    host_ports: Mapping[int, int]
    started_at: datetime | None
    finished_at: datetime | None
    # The container's main process as this machine's /proc sees it: set only by a runtime
    # beside a local engine, and only while the container runs (see netns.py).
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class ExitStatus:
    exit_code: int
    oom_killed: bool


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True, slots=True)
class RuntimeCapabilities:
    # None until the runtime has tried a disk limit (the engine only tells us by refusing).
    disk_limit: bool | None
    # Whether `enable_internet=False` is enforced at all by this runtime.
    internet_isolation: bool
    # Whether a host firewall rule refuses whatever a no-internet container sends out
    # (not only the missing NAT); None until the first such container ran.
    egress_firewall: bool | None = None


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """The engine host, so instance types can be capped to what it has."""

    cpus: int
    memory_bytes: int
    version: str
    # Whether the engine runs with user namespace remapping (module docstring).
    userns_remap: bool


class ExecProcess(Protocol):
    """A command running inside a container, used as `async with`.

        async with runtime.exec_stream(cid, ["sh", "-c", "..."]) as proc:
            async for stream, chunk in proc:   # stream is "stdout" or "stderr"
                ...
            code = await proc.exit_code()

    `exit_code()` drains (and drops) any output not read yet, then waits for the exit.
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]: ...

    async def exit_code(self) -> int: ...


@runtime_checkable
class ImageStore(Protocol):
    """Images on the engine. Pulling from a registry is `ImagePuller`'s, not this."""

    async def build_image(
        self,
        context_dir: Path,
        dockerfile: Path,
        tag: str,
        build_args: Mapping[str, str],
        on_output: Callable[[str], None],
        labels: Mapping[str, str] | None = None,
    ) -> str:
        """Build `dockerfile` (absolute, or relative to `context_dir`) and tag it `tag`.

        Each line of build output goes to `on_output`. Returns the image id.
        Raises `ImageError` with the failing step and the last output lines.
        """
        ...

    async def image_id(self, ref: str) -> str | None:
        """The image's id (``sha256:…``), or None when the engine does not have it."""
        ...


@runtime_checkable
class ImagePorts(Protocol):
    """What an image says about its ports (kept apart from `ImageStore`, so a fake
    store need not answer it)."""

    async def exposed_ports(self, ref: str) -> tuple[int, ...]:
        """The TCP ports the image EXPOSEs, sorted. Raises `ContainerError` (its
        `EngineUnavailable` subclass when the engine is down) if it cannot be inspected."""
        ...


@runtime_checkable
class ImagePuller(Protocol):
    """Pulling images from a registry (kept apart from `ImageStore`: a runtime without it
    runs only images the engine has, and a fake store need not pull)."""

    async def pull(
        self,
        ref: str,
        auth: Mapping[str, str] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> str:
        """Pull `ref` (``registry/repo:tag`` or ``registry/repo@sha256:…``) into the
        engine and return the image id. `auth` is the engine's credential object
        (``{"username", "password"}`` or ``{"identitytoken"}``); each progress message of
        the engine (``status``, ``id``, ``progressDetail``) goes to `on_progress`.

        Raises `ImageError` naming the registry when it cannot be reached, refuses the
        credentials, or has no such image, tag or digest; `EngineUnavailable` when the
        engine itself does not answer.
        """
        ...


@runtime_checkable
class EgressListeners(Protocol):
    """Listening sockets inside a container's own network namespace, served by this
    process (the egress proxy of containers/egress_proxy.py). Optional: a runtime without it
    runs no class that uses egress control."""

    @property
    def egress_listeners(self) -> str | None:
        """None when `listen_in_container` can work here; else what it needs (a sentence:
        "root", "a local engine", ...)."""
        ...

    async def listen_in_container(self, container_id: str, port: int) -> socket.socket:
        """A non-blocking socket listening on 127.0.0.1:`port` as the running container
        sees it. Raises `ContainerError` when the container's namespace cannot be entered
        or the port is taken there."""
        ...


@runtime_checkable
class NamespaceConnections(Protocol):
    """Connections made inside a container's own network namespace, to a port on its
    loopback: how requests reach a container without the engine's userland proxy
    (containers/upstream.py). Optional: a runtime without it has requests go to the
    container's published port."""

    @property
    def namespace_connections(self) -> str | None:
        """None when `connect_in_container` can work here; else what it needs."""
        ...

    async def connect_in_container(
        self, container_id: str, port: int, *, pid: int | None = None
    ) -> socket.socket:
        """A non-blocking socket connected to 127.0.0.1:`port` as the running container
        sees it. ``pid``, the container's main process as `ContainerInfo.pid` gave it,
        saves a lookup where the runtime can use it. Raises `ContainerError` when the
        namespace cannot be entered, `ContainerError` or `OSError` when nothing accepts
        the connection there."""
        ...


@runtime_checkable
class ContainerLifecycle(Protocol):
    """Create, watch, signal and remove containers. Any method raises `EngineUnavailable`
    when the engine cannot be reached; see "Engine outages" in the module docstring."""

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a container; the result knows its host ports.

        Raises `ImageError` when the image is not present (nothing is ever pulled) and
        `StartFailed` when the engine cannot start it (bad entrypoint, name in use, ...);
        a container that failed to start is removed again.
        """
        ...

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container's current state, or None when the engine says it does not exist.

        Raises `EngineUnavailable` when the engine cannot be asked (never None then).
        """
        ...

    async def wait(self, container_id: str) -> ExitStatus:
        """Wait until the container is not running; returns at once if it already exited.

        Returns only an exit status the engine reported. Raises `ContainerGone` if the
        container does not exist when called, and `EngineUnavailable` when the engine
        cannot be reached or goes away while waiting: the container may well still run,
        so wait again once the engine is back.
        """
        ...

    async def signal(self, container_id: str, sig: str | int) -> None:
        """Send a signal to the main process; a no-op when the container is not running.

        Like `stop` and `kill`, raises `ContainerGone` when the container does not exist.
        """
        ...

    async def stop(self, container_id: str, grace_period: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace_period` seconds; returns once it stopped."""
        ...

    async def pause(self, container_id: str) -> None:
        """Freeze every process of the container (memory stays, CPU stops)."""
        ...

    async def unpause(self, container_id: str) -> None: ...

    async def set_cpu_limit(self, container_id: str, vcpu: float) -> None:
        """Change a running container's CPU quota (the end of a start boost)."""
        ...

    async def kill(self, container_id: str) -> None:
        """SIGKILL now; a no-op when the container is not running."""
        ...

    async def remove(self, container_id: str) -> None:
        """Remove the container, killing it if needed; a no-op when it is already gone."""
        ...

    async def list(self, labels: Mapping[str, str]) -> builtins.list[ContainerInfo]:
        """Every container, running or not, that carries ALL of `labels`.

        Raises `EngineUnavailable` when the engine cannot be asked (never an empty list).
        """
        ...

    async def engine_info(self) -> EngineInfo:
        """The engine host's CPUs and memory, and how the engine runs."""
        ...


@runtime_checkable
class ContainerExec(Protocol):
    """Commands run inside a running container."""

    async def exec(
        self,
        container_id: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """Run `cmd` to its end; its output, split by stream, and its exit code.

        Raises `ContainerError` when the container is not running, `ContainerGone` when
        it does not exist.
        """
        ...

    def exec_stream(
        self,
        container_id: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> ExecProcess:
        """`cmd` with its output streamed as it comes (see `ExecProcess`)."""
        ...


@runtime_checkable
class ContainerLogs(Protocol):
    """What containers print."""

    def logs(
        self, container_id: str, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[str]:
        """Log lines (stdout and stderr interleaved, without the newline).

        With `follow`, keeps going until the container stops or the iterator is closed.
        """
        ...


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    """One thing the engine did to a container (its events stream)."""

    # "create", "start", "die", "oom", "pause", "unpause", "stop", "kill", "destroy"
    action: str
    container_id: str
    labels: Mapping[str, str]
    # Unix seconds, from the engine's own clock (timeNano).
    time: float
    # "die" only.
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line a container printed, as the engine stored it."""

    time: float  # Unix seconds, the engine's timestamp of the line
    stream: str  # "stdout" or "stderr"
    text: str  # without the newline


@dataclass(frozen=True, slots=True)
class ContainerStats:
    """One reading of a running container's cgroup and network counters."""

    time: float  # Unix seconds, when the engine read them
    cpu_ns: int  # cumulative CPU time (user + system) since the container started
    memory_bytes: int  # current memory use (without page cache where the engine says)
    rx_bytes: int  # cumulative, all interfaces
    tx_bytes: int  # cumulative, all interfaces (egress)


@runtime_checkable
class ContainerObservation(Protocol):
    """What the node watches: engine events, log lines with their stream and time, and
    resource counters. Not part of ``ContainerRuntime``: app processes never watch."""

    def events(
        self, labels: Mapping[str, str], since: float | None = None
    ) -> AsyncIterator[ContainerEvent]:
        """Events of containers carrying all of ``labels``, from ``since`` (Unix seconds;
        None: from now) on, until the iterator is closed. Raises ``EngineUnavailable``
        when the stream cannot be opened or breaks."""
        ...

    def log_lines(
        self, container_id: str, *, follow: bool, since: float | None = None
    ) -> AsyncIterator[LogLine]:
        """The container's lines from ``since`` on (None: all it kept); with ``follow``,
        until the container stops or the iterator is closed."""
        ...

    async def stats(self, container_id: str) -> ContainerStats | None:
        """One reading; None when the container is not running or is gone."""
        ...


@runtime_checkable
class LogFiles(Protocol):
    """An engine whose log files this process can read itself (a local engine with the
    json-file driver, and the permission to read its files). The watcher then reads lines
    from the file, which costs the engine nothing, and falls back to `log_lines`."""

    async def log_file(self, container_id: str) -> str | None:
        """The path of the container's json-file log, or None when it cannot be read
        here (another driver, a remote engine, no permission, no such container)."""
        ...


@runtime_checkable
class ContainerRuntime(ImageStore, ContainerLifecycle, ContainerExec, ContainerLogs, Protocol):
    """A whole container engine, as the node holds it. Every method raises only
    `ContainerError` subclasses: `EngineUnavailable` (no engine answering), `ImageError`,
    `StartFailed`, `ContainerGone` (the container no longer exists) or plain
    `ContainerError`.
    """

    @property
    def capabilities(self) -> RuntimeCapabilities: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def aclose(self) -> None: ...
