"""The one interface Dockyard uses to talk to a container engine.

Everything above this module (the `Container` object, the CLI, the platform) sees only
these dataclasses and the `ContainerRuntime` protocol; `docker.py` implements it on the
Docker Engine API, and tests may pass a small fake instead. Implementations raise only
`dockyard.errors.ContainerError` and its subclasses.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable


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
class ContainerRuntime(Protocol):
    """A container engine. Every method raises only `ContainerError` subclasses:
    `EngineUnavailable` (no engine answering), `ImageError`, `StartFailed`,
    `ContainerGone` (the container no longer exists) or plain `ContainerError`.
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
        """Build `dockerfile` (absolute, or relative to `context_dir`) and tag it `tag`.

        Each line of build output goes to `on_output`. Returns the image id.
        Raises `ImageError` with the failing step and the last output lines.
        """
        ...

    async def image_id(self, ref: str) -> str | None:
        """The image's id (``sha256:…``), or None when the engine does not have it."""
        ...

    # Containers

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a container; the result knows its host ports.

        Raises `ImageError` when the image is not present (nothing is ever pulled) and
        `StartFailed` when the engine cannot start it (bad entrypoint, name in use, ...);
        a container that failed to start is removed again.
        """
        ...

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container's current state, or None when it no longer exists."""
        ...

    async def wait(self, container_id: str) -> ExitStatus:
        """Wait until the container is not running; returns at once if it already exited.

        Raises `ContainerGone` if it does not exist when called.
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

    async def kill(self, container_id: str) -> None:
        """SIGKILL now; a no-op when the container is not running."""
        ...

    async def remove(self, container_id: str) -> None:
        """Remove the container, killing it if needed; a no-op when it is already gone."""
        ...

    async def exec(
        self,
        container_id: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> ExecResult: ...

    def exec_stream(
        self,
        container_id: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
    ) -> ExecProcess: ...

    def logs(
        self, container_id: str, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[str]:
        """Log lines (stdout and stderr interleaved, without the newline).

        With `follow`, keeps going until the container stops or the iterator is closed.
        """
        ...

    async def list(self, labels: Mapping[str, str]) -> builtins.list[ContainerInfo]:
        """Every container, running or not, that carries ALL of `labels`."""
        ...
