"""The node's side of containers: images, capacity, adoption after restarts, shutdown.

One ``ContainerManager`` per app. Each Container object gets a ``ContainerHandle`` (its
``ctx.container``) through which it starts, signals and watches its one container; the
manager enforces ``max_instances`` and the start rate across all of them, and is the one
place that knows every container the app runs, so nothing is left behind on exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

from ..config import Config, ContainerConfig
from ..errors import ContainerError, ImageError, NoCapacity, TooManyStarts
from .images import ensure_image
from .proxy import open_session
from .runtime import ContainerInfo, ContainerRuntime, ContainerSpec, ExitStatus
from .upstream import UpstreamPool

__all__ = ["ContainerHandle", "ContainerManager"]

log = logging.getLogger("dockyard.containers")

LABEL_APP = "dockyard.app"
LABEL_CLASS = "dockyard.class"
LABEL_OBJECT = "dockyard.object_id"
LABEL_NAME = "dockyard.object_name"
LABEL_VERSION = "dockyard.version"

# Platform stops (dev exit, sleep) send SIGTERM, then SIGKILL after this many seconds.
DEFAULT_STOP_GRACE = 10.0
# Starts per second per class before a start is answered with 429.
DEFAULT_STARTS_PER_SECOND = 100

Waker = Callable[[str, str], Awaitable[None]]


@dataclass
class ClassImage:
    config: ContainerConfig
    image: str | None = None
    error: ImageError | None = None

    @property
    def version(self) -> str:
        # A built image's tag is its content hash; a referenced image runs by its id.
        return (self.image or "").rsplit(":", 1)[-1][:12]


@dataclass
class _Capacity:
    running: set[str] = field(default_factory=set)
    starting: int = 0
    recent_starts: list[float] = field(default_factory=list)


class ContainerManager:
    def __init__(
        self,
        runtime: ContainerRuntime,
        config: Config,
        *,
        location: str = "local",
        stop_grace: float = DEFAULT_STOP_GRACE,
        starts_per_second: int = DEFAULT_STARTS_PER_SECOND,
        on_build_output: Callable[[str], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.app = config.name
        self.location = location
        self.stop_grace = stop_grace
        self.starts_per_second = starts_per_second
        self._config = config
        self._on_build_output = on_build_output or (lambda line: log.info("%s", line))
        self.classes: dict[str, ClassImage] = {
            c.class_name: ClassImage(c) for c in config.containers
        }
        self._capacity: dict[str, _Capacity] = {name: _Capacity() for name in self.classes}
        self._adoptable: dict[str, ContainerInfo] = {}
        self._exits: dict[str, asyncio.Event] = {}
        self._session: aiohttp.ClientSession | None = None
        self._upstream = UpstreamPool()
        self._waker: Waker | None = None
        self._warned_disk = False
        # Containers the platform itself stopped (at exit), so their end reads as a stop.
        self.platform_stops: set[str] = set()

    @property
    def upstream(self) -> UpstreamPool:
        """The pooled connections that carry proxied requests to containers."""
        return self._upstream

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = open_session()
        return self._session

    def set_waker(self, waker: Waker) -> None:
        """How to bring an object to life so it can adopt its running container."""
        self._waker = waker

    def handle(self, class_name: str, object_id: str, object_name: str | None) -> ContainerHandle:
        return ContainerHandle(self, class_name, object_id, object_name)

    # Lifecycle

    async def start(self) -> None:
        for name, entry in self.classes.items():
            await self._prepare_image(name, entry)
        await self._adopt_or_remove()

    async def _prepare_image(self, name: str, entry: ClassImage) -> None:
        c = entry.config
        try:
            entry.image = await ensure_image(
                self.runtime,
                app=self.app,
                class_name=name,
                image=c.image,
                dockerfile=c.dockerfile_path if c.is_dockerfile else None,
                context=c.build_context_path,
                build_args=c.image_vars,
                on_output=self._on_build_output,
            )
        except ImageError as exc:
            # Keep serving: the worker still runs, and every start of this class answers
            # 500 with the build failure until the Dockerfile is fixed.
            entry.error = exc
            log.error("Image for %s is not available: %s", name, exc)

    async def _adopt_or_remove(self) -> None:
        """Re-take the containers a previous run of this app left behind, or remove them."""
        found = await self.runtime.list({LABEL_APP: self.app})
        by_object: dict[str, list[ContainerInfo]] = {}
        for info in found:
            entry = self.classes.get(info.labels.get(LABEL_CLASS, ""))
            current = (
                entry is not None
                and entry.image is not None
                and info.running
                and info.labels.get(LABEL_VERSION) == entry.version
            )
            if current:
                by_object.setdefault(info.labels.get(LABEL_OBJECT, ""), []).append(info)
            else:
                log.info("Removing leftover container %s (%s)", info.name, info.status)
                await self.runtime.remove(info.id)
        for object_id, infos in by_object.items():
            newest, *extra = sorted(infos, key=lambda i: str(i.started_at), reverse=True)
            for duplicate in extra:
                log.warning(
                    "Removing duplicate container %s for object %s", duplicate.name, object_id
                )
                await self.runtime.remove(duplicate.id)
            self._adoptable[object_id] = newest
            self._capacity[newest.labels[LABEL_CLASS]].running.add(newest.id)
        for object_id, info in list(self._adoptable.items()):
            log.info("Adopting running container %s", info.name)
            if self._waker is not None:
                await self._waker(info.labels[LABEL_CLASS], object_id)

    async def stop(self) -> None:
        """Stop every container of this app (SIGTERM, then SIGKILL after the grace period)."""
        running = [cid for cap in self._capacity.values() for cid in cap.running]
        for info in self._adoptable.values():  # adopted but never claimed by an object
            if info.id not in running:
                running.append(info.id)
        if running:
            log.info("Stopping %d container(s)", len(running))
        await asyncio.gather(*(self._stop_one(cid) for cid in running), return_exceptions=True)
        # A start cut short (a timeout between create and start) can leave a container
        # that never ran; nothing of this app stays behind.
        try:
            for info in await self.runtime.list({LABEL_APP: self.app}):
                if not info.running:
                    await self.runtime.remove(info.id)
        except ContainerError as exc:
            log.warning("Could not clean up stopped containers: %s", exc)
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._upstream.close()

    async def _stop_one(self, container_id: str) -> None:
        self.platform_stops.add(container_id)
        await self.runtime.stop(container_id, self.stop_grace)
        exited = self._exits.get(container_id)
        if exited is not None:
            # Let the owning object record the exit and run on_stop before we go.
            try:
                await asyncio.wait_for(exited.wait(), 5.0)
            except TimeoutError:
                pass
        await self.runtime.remove(container_id)

    # Used by handles

    def claim_adopted(self, object_id: str) -> ContainerInfo | None:
        return self._adoptable.pop(object_id, None)

    def offer_for_adoption(self, object_id: str, info: ContainerInfo) -> None:
        """A container whose object instance went away, for the next instance to take."""
        self._adoptable[object_id] = info

    def image_for(self, class_name: str) -> ClassImage:
        entry = self.classes.get(class_name)
        if entry is None:
            raise ContainerError(
                f"class {class_name!r} is not configured as a container: add "
                f'{{"class_name": "{class_name}", "image": "./Dockerfile"}} to containers '
                "in the wrangler config"
            )
        if entry.error is not None:
            raise entry.error
        assert entry.image is not None
        return entry

    async def launch(self, class_name: str, spec: ContainerSpec) -> ContainerInfo:
        cap = self._capacity[class_name]
        limit = self.classes[class_name].config.max_instances
        if len(cap.running) + cap.starting >= limit:
            raise NoCapacity(
                f"max_instances ({limit}) reached for container class {class_name!r}: "
                f"{len(cap.running)} running, {cap.starting} starting. Raise max_instances "
                "in the wrangler config, or wait for an instance to sleep."
            )
        now = time.monotonic()
        cap.recent_starts = [t for t in cap.recent_starts if now - t < 1.0]
        if len(cap.recent_starts) >= self.starts_per_second:
            raise TooManyStarts(
                f"more than {self.starts_per_second} starts per second for container class "
                f"{class_name!r}; retry shortly"
            )
        cap.recent_starts.append(now)
        cap.starting += 1
        try:
            info = await self.runtime.run(spec)
        finally:
            cap.starting -= 1
        cap.running.add(info.id)
        self._exits[info.id] = asyncio.Event()
        if self.runtime.capabilities.disk_limit is False and not self._warned_disk:
            self._warned_disk = True
            log.warning(
                "Disk sizes of instance types are not enforced: the engine's storage driver "
                "cannot limit a container's disk (overlay2 needs xfs with pquota)"
            )
        return info

    def adopted(self, class_name: str, info: ContainerInfo) -> None:
        self._capacity[class_name].running.add(info.id)
        self._exits.setdefault(info.id, asyncio.Event())

    def exited(self, class_name: str, container_id: str) -> None:
        self._capacity[class_name].running.discard(container_id)
        event = self._exits.pop(container_id, None)
        if event is not None:
            event.set()

    def running_count(self, class_name: str) -> int:
        return len(self._capacity[class_name].running)


class ContainerHandle:
    """``ctx.container`` of one Container object: its one container on the engine."""

    def __init__(
        self,
        manager: ContainerManager,
        class_name: str,
        object_id: str,
        object_name: str | None,
    ) -> None:
        self.manager = manager
        self.runtime = manager.runtime
        self.class_name = class_name
        self.object_id = object_id
        self.object_name = object_name
        self.info: ContainerInfo | None = None
        self.paused = False
        self.stopped_by_platform = False
        self.last_output: list[str] = []

    def last_output_summary(self) -> str:
        return "; last output: " + " | ".join(self.last_output) if self.last_output else ""

    @property
    def running(self) -> bool:
        return self.info is not None

    def adopt(self) -> ContainerInfo | None:
        info = self.manager.claim_adopted(self.object_id)
        if info is not None:
            self.manager.adopted(self.class_name, info)
            self.info = info
            self.paused = info.status == "paused"
        return info

    async def start(
        self,
        *,
        env: Mapping[str, str],
        entrypoint: Sequence[str] | None,
        enable_internet: bool,
        ports: Sequence[int],
        labels: Mapping[str, str] | None = None,
    ) -> ContainerInfo:
        entry = self.manager.image_for(self.class_name)
        resources = entry.config.resources
        assert entry.image is not None
        spec = ContainerSpec(
            image=entry.image,
            labels={
                **(labels or {}),
                LABEL_APP: self.manager.app,
                LABEL_CLASS: self.class_name,
                LABEL_OBJECT: self.object_id,
                LABEL_NAME: self.object_name or "",
                LABEL_VERSION: entry.version,
            },
            env={
                **env,
                "DOCKYARD_DURABLE_OBJECT_ID": self.object_id,
                "DOCKYARD_APPLICATION": self.manager.app,
                "DOCKYARD_LOCATION": self.manager.location,
            },
            entrypoint=entrypoint,
            ports=sorted(set(ports)),
            vcpu=resources.vcpu,
            memory_mib=resources.memory_mib,
            disk_mb=resources.disk_mb,
            enable_internet=enable_internet,
        )
        self.info = await self.manager.launch(self.class_name, spec)
        return self.info

    async def monitor(self) -> ExitStatus:
        """Wait for the container to exit, then remove it and give its slot back."""
        info = self.info
        assert info is not None, "monitor() before start()"
        try:
            status = await self.runtime.wait(info.id)
        except ContainerError:
            status = ExitStatus(exit_code=-1, oom_killed=False)
        # Keep the last words before the container (and its log) is removed.
        try:
            self.last_output = [line async for line in self.runtime.logs(info.id, tail=5)]
        except ContainerError:
            self.last_output = []
        try:
            await self.runtime.remove(info.id)
        except ContainerError as exc:
            log.warning("Could not remove container %s: %s", info.name, exc)
        self.info = None
        self.paused = False
        self.stopped_by_platform = info.id in self.manager.platform_stops
        self.manager.exited(self.class_name, info.id)
        return status

    def host_port(self, port: int) -> int:
        assert self.info is not None
        host_port = self.info.host_ports.get(port)
        if host_port is None:
            published = ", ".join(str(p) for p in sorted(self.info.host_ports)) or "none"
            raise ContainerError(
                f"port {port} of the container is not published (published: {published}); "
                "list it in default_port or required_ports of the Container class"
            )
        return host_port

    def detach(self) -> None:
        """Let go of a running container so another instance of the object adopts it."""
        if self.info is not None:
            paused = self.paused
            self.manager.offer_for_adoption(
                self.object_id,
                dataclasses.replace(self.info, status="paused" if paused else "running"),
            )
            self.info = None
            self.paused = False

    async def pause(self) -> None:
        if self.info is not None and not self.paused:
            await self.runtime.pause(self.info.id)
            self.paused = True

    async def unpause(self) -> None:
        if self.info is not None and self.paused:
            await self.runtime.unpause(self.info.id)
            self.paused = False

    async def signal(self, sig: str | int) -> None:
        if self.info is not None:
            # A frozen process cannot act on a signal: thaw it first.
            await self.unpause()
            await self.runtime.signal(self.info.id, sig)

    async def destroy(self) -> None:
        if self.info is not None:
            await self.unpause()
            await self.runtime.kill(self.info.id)
