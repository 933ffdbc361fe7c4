"""The node's side of containers: images, capacity, supervisors, adoption, shutdown.

One ``ContainerManager`` per app. It owns one ``ContainerSupervisor`` per object that
has (or had) a container, enforces ``max_instances`` and the start rate across them,
and is the one place that knows every container the app runs, so nothing is left
behind on exit. It only ever touches containers labelled with its own ``owner``
(unique to one state folder or node): another Dockyard's containers, even of an app
with the same name, are never adopted, stopped or removed.

A little over 400 lines: capacity, adoption and the container spec all read the same
per-class state (image, limits), which is kept here rather than spread out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

from ..config import Config, ContainerConfig
from ..errors import ContainerError, EngineUnavailable, ImageError, NoCapacity, TooManyStarts
from ..observe.records import LogRecord, LogSink
from ..settings import ContainerSettings
from . import labels
from .images import ensure_image
from .proxy import open_session
from .runtime import (
    ContainerInfo,
    ContainerRuntime,
    ContainerSpec,
    ImagePorts,
    NamespaceConnections,
)
from .supervisor import ContainerOptions, ContainerSupervisor, Phase
from .upstream import UpstreamPool

__all__ = ["ContainerManager"]

log = logging.getLogger("dockyard.containers")

Waker = Callable[[str, str], Awaitable[None]]


@dataclass
class ClassImage:
    config: ContainerConfig
    image: str | None = None
    error: ImageError | None = None
    # The instance type's CPUs, capped to what the engine's host has.
    vcpu: float | None = None
    # The ports the image EXPOSEs: published at every start, reachable by container_fetch.
    exposed_ports: tuple[int, ...] = ()

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
        settings: ContainerSettings | None = None,
        *,
        owner: str,
        on_build_output: Callable[[str], None] | None = None,
        images: Mapping[str, str] | None = None,
    ) -> None:
        self.runtime = runtime
        self.app = config.name
        self.owner = owner
        self.settings = settings or ContainerSettings()
        # Requests reach containers on their own loopback where the runtime can connect
        # there (NamespaceConnections: root beside a local engine, or such a node).
        connect_inside = None
        if (
            self.settings.upstream_in_namespace
            and isinstance(runtime, NamespaceConnections)
            and runtime.namespace_connections is None
        ):
            connect_inside = runtime.connect_in_container
        self.upstream_in_namespace = connect_inside is not None
        self._config = config
        self._on_build_output = on_build_output or (lambda line: log.info("%s", line))
        self.classes: dict[str, ClassImage] = {
            c.class_name: ClassImage(c) for c in config.containers
        }
        self._capacity: dict[str, _Capacity] = {name: _Capacity() for name in self.classes}
        self._supervisors: dict[tuple[str, str], ContainerSupervisor] = {}
        self._session: aiohttp.ClientSession | None = None
        self._upstream = UpstreamPool(connect_inside=connect_inside)
        self._waker: Waker | None = None
        self._warned_disk = False
        self._stopping = False
        # Objects whose last start ended with the engine not answering (see _reconcile).
        self._unsure: set[tuple[str, str]] = set()
        # Containers the platform itself stopped (at exit), so their end reads as a stop.
        self.platform_stops: set[str] = set()
        # On a node, the deployed version this process runs (its containers' DEPLOY label).
        self.deploy_version: int | None = None
        # On a node, images come built and pushed by `dockyard deploy` (class -> run
        # reference by digest), nothing is built here, and a container of an earlier
        # version is adopted as it is: a rollout, not a restart, replaces it.
        self._images = dict(images) if images is not None else None
        # Where platform events go (container started, stopped, failed to start), and
        # who times each request forwarded to a container (class, seconds to its head).
        self.sink: LogSink | None = None
        self.on_container_request: Callable[[str, float], None] | None = None

    @property
    def labels(self) -> dict[str, str]:
        """The labels that select this manager's containers on the engine."""
        return {labels.APP: self.app, labels.OWNER: self.owner}

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
        """How to bring an object to life so its instance attaches to its supervisor."""
        self._waker = waker

    def supervisor(
        self, class_name: str, object_id: str, object_name: str | None
    ) -> ContainerSupervisor:
        """The one supervisor of this object's container (made on first use)."""
        self.image_entry(class_name)
        key = (class_name, object_id)
        supervisor = self._supervisors.get(key)
        if supervisor is None:
            supervisor = ContainerSupervisor(self, class_name, object_id, object_name)
            self._supervisors[key] = supervisor
        elif supervisor.object_name is None and object_name is not None:
            supervisor.object_name = object_name
        return supervisor

    def forget_if_idle(self, supervisor: ContainerSupervisor) -> None:
        """Drop a supervisor nothing needs any more (no instance, no container, no work)."""
        key = (supervisor.class_name, supervisor.object_id)
        if not supervisor.attached and not supervisor.busy and not self._stopping:
            if self._supervisors.get(key) is supervisor:
                del self._supervisors[key]

    def supervisors(self) -> list[ContainerSupervisor]:
        return list(self._supervisors.values())

    async def wake(self, supervisor: ContainerSupervisor) -> None:
        if self._waker is not None:
            await self._waker(supervisor.class_name, supervisor.object_id)

    def phase_changed(self, supervisor: ContainerSupervisor) -> None:
        """Every phase change of every container passes here (metrics hang off it)."""

    def record(
        self,
        supervisor: ContainerSupervisor,
        event: str,
        message: str,
        *,
        container_id: str = "",
        level: str = "info",
        **fields: object,
    ) -> None:
        """A platform event about one object's container (observe.records.EVENTS)."""
        if self.sink is None:
            return
        self.sink.emit(
            LogRecord(
                app=self.app,
                message=message,
                source="platform",
                stream="event",
                level=level,
                class_name=supervisor.class_name,
                object_id=supervisor.object_id,
                object_name=supervisor.object_name or "",
                container_id=container_id,
                event=event,
                fields=fields,
            )
        )

    # Lifecycle

    async def start(self) -> None:
        cpus = float(os.cpu_count() or 1)
        for name, entry in self.classes.items():
            self._cap_cpus(name, entry, cpus)
            await self._prepare_image(name, entry)
        await self._adopt_or_remove()

    def _cap_cpus(self, name: str, entry: ClassImage, cpus: float) -> None:
        wanted = entry.config.resources.vcpu
        entry.vcpu = min(wanted, cpus)
        if wanted > cpus:
            log.warning(
                "Container class %s asks for %g vCPU (instance_type); this host has %g: "
                "its containers get %g",
                name,
                wanted,
                cpus,
                cpus,
            )

    async def set_images(self, images: Mapping[str, str]) -> None:
        """A new version on a node: starts from now on use these images (by class)."""
        self._images = dict(images)
        for name, entry in self.classes.items():
            entry.error = None
            await self._prepare_image(name, entry)

    async def _prepare_image(self, name: str, entry: ClassImage) -> None:
        c = entry.config
        try:
            if self._images is not None:
                ref = self._images.get(name)
                if ref is None:
                    raise ImageError(f"the deployed version has no image for class {name!r}")
                entry.image = ref
                if isinstance(self.runtime, ImagePorts):
                    entry.exposed_ports = await self.runtime.exposed_ports(ref)
                return
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
            if isinstance(self.runtime, ImagePorts):
                entry.exposed_ports = await self.runtime.exposed_ports(entry.image)
        except ImageError as exc:
            # Keep serving: the worker still runs, and every start of this class answers
            # 500 with the build failure until the Dockerfile is fixed.
            entry.error = exc
            log.error("Image for %s is not available: %s", name, exc)

    async def _adopt_or_remove(self) -> None:
        """Re-take the containers a previous run of this app left behind, or remove them.

        Only containers with this manager's owner label: the lock on the state folder
        (or the node's data folder) makes sure no other live Dockyard has that owner.
        """
        found = await self.runtime.list(self.labels)
        by_object: dict[tuple[str, str], list[ContainerInfo]] = {}
        for info in found:
            entry = self.classes.get(info.labels.get(labels.CLASS, ""))
            current = (
                entry is not None
                and entry.image is not None
                and info.status in ("running", "paused")
                and (self._images is not None or info.labels.get(labels.VERSION) == entry.version)
            )
            if current:
                key = (info.labels[labels.CLASS], info.labels.get(labels.OBJECT, ""))
                by_object.setdefault(key, []).append(info)
            else:
                log.info("Removing leftover container %s (%s)", info.name, info.status)
                await self.runtime.remove(info.id)
        for (class_name, object_id), infos in by_object.items():
            newest, *extra = sorted(infos, key=lambda i: str(i.started_at), reverse=True)
            for duplicate in extra:
                log.warning(
                    "Removing duplicate container %s for object %s", duplicate.name, object_id
                )
                await self.runtime.remove(duplicate.id)
            name = newest.labels.get(labels.NAME) or None
            supervisor = self.supervisor(class_name, object_id, name)
            self._capacity[class_name].running.add(newest.id)
            supervisor.adopt(newest)
            # The last run may have died during its start boost: the quota applies now.
            try:
                await self.apply_cpu_quota(supervisor)
            except ContainerError as exc:
                log.warning("%s: could not apply its CPU quota: %s", supervisor, exc)
        for supervisor in self.supervisors():
            # The instance attaches and arms the sleep timer with its class's settings.
            await self.wake(supervisor)

    async def stop(self, *, leave_running: bool = False) -> None:
        """Stop every container of this app (SIGTERM, then SIGKILL after the grace period).

        With ``leave_running`` (an app process on a node handing over to its next one),
        containers keep running for the next process to adopt; only this process's
        watching of them ends.
        """
        self._stopping = True
        if leave_running:
            supervisors = self.supervisors()
            await asyncio.gather(*(s.let_go() for s in supervisors), return_exceptions=True)
            self._supervisors.clear()
            if self._session is not None:
                await self._session.close()
                self._session = None
            self._upstream.close()
            return
        supervisors = self.supervisors()
        running = [s for s in supervisors if s.info is not None]
        if running:
            log.info("Stopping %d container(s)", len(running))
        for supervisor in running:
            assert supervisor.info is not None
            self.platform_stops.add(supervisor.info.id)
        await asyncio.gather(
            *(s.aclose(self.settings.stop_grace) for s in supervisors), return_exceptions=True
        )
        # A start cut short (a timeout between create and start) can leave a container
        # that never ran, or one the engine started after it stopped answering that no
        # supervisor knows of; nothing of this app stays behind.
        try:
            for info in await self.runtime.list(self.labels):
                await self.runtime.remove(info.id)
        except ContainerError as exc:
            log.warning("Could not clean up stopped containers: %s", exc)
        self._supervisors.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._upstream.close()

    # Used by supervisors

    def image_entry(self, class_name: str) -> ClassImage:
        entry = self.classes.get(class_name)
        if entry is None:
            raise ContainerError(
                f"class {class_name!r} is not configured as a container: add "
                f'{{"class_name": "{class_name}", "image": "./Dockerfile"}} to containers '
                "in the wrangler config"
            )
        return entry

    async def launch(
        self,
        supervisor: ContainerSupervisor,
        options: ContainerOptions | None = None,
        *,
        env: dict[str, str],
        entrypoint: Sequence[str] | None,
        enable_internet: bool,
        ports: Sequence[int],
        boost: bool,
        extra_labels: Mapping[str, str] | None = None,
    ) -> ContainerInfo:
        class_name = supervisor.class_name
        entry = self.image_entry(class_name)
        if entry.error is not None:
            raise entry.error
        assert entry.image is not None
        own_labels = _class_labels(class_name, extra_labels or {})
        cap = self._capacity[class_name]
        limit = entry.config.max_instances
        if len(cap.running) + cap.starting >= limit:
            raise NoCapacity(
                f"max_instances ({limit}) reached for container class {class_name!r}: "
                f"{len(cap.running)} running, {cap.starting} starting. Raise max_instances "
                "in the wrangler config, or wait for an instance to sleep."
            )
        now = time.monotonic()
        cap.recent_starts = [t for t in cap.recent_starts if now - t < 1.0]
        if len(cap.recent_starts) >= self.settings.starts_per_second:
            raise TooManyStarts(
                f"more than {self.settings.starts_per_second} starts per second for container "
                f"class {class_name!r}; retry shortly"
            )
        cap.recent_starts.append(now)
        resources = entry.config.resources
        spec = ContainerSpec(
            image=entry.image,
            labels={
                **own_labels,
                labels.APP: self.app,
                labels.OWNER: self.owner,
                labels.CLASS: class_name,
                labels.OBJECT: supervisor.object_id,
                labels.NAME: supervisor.object_name or "",
                labels.VERSION: entry.version,
                **(
                    {} if self.deploy_version is None else {labels.DEPLOY: str(self.deploy_version)}
                ),
                labels.VCPU: f"{entry.vcpu:g}",
                labels.MEMORY_MIB: str(resources.memory_mib),
                labels.DISK_MB: str(resources.disk_mb),
            },
            env={
                **env,
                "DOCKYARD_DURABLE_OBJECT_ID": supervisor.object_id,
                "DOCKYARD_APPLICATION": self.app,
                "DOCKYARD_LOCATION": self.settings.location,
                # Cloudflare's names for the same, so images built for it run unchanged.
                # One node is one place: its location stands for the region too, and the
                # country is "XX" (unknown), as Cloudflare writes an unknown country.
                "CLOUDFLARE_DURABLE_OBJECT_ID": supervisor.object_id,
                "CLOUDFLARE_APPLICATION_ID": self.app,
                "CLOUDFLARE_LOCATION": self.settings.location,
                "CLOUDFLARE_REGION": self.settings.location,
                "CLOUDFLARE_COUNTRY_A2": "XX",
            },
            entrypoint=entrypoint,
            ports=sorted({*ports, *entry.exposed_ports}),
            vcpu=None if boost else entry.vcpu,
            memory_mib=resources.memory_mib,
            disk_mb=resources.disk_mb,
            enable_internet=enable_internet,
        )
        spec = _harden(spec, options)
        cap.starting += 1
        try:
            adopted = await self._reconcile(supervisor, entry)
            if adopted is not None:
                cap.running.add(adopted.id)
                return adopted
            info = await self.runtime.run(spec)
        except (EngineUnavailable, asyncio.CancelledError):
            # The engine may still carry this start out once it answers again.
            self._unsure.add((class_name, supervisor.object_id))
            raise
        finally:
            cap.starting -= 1
        cap.running.add(info.id)
        if self.runtime.capabilities.disk_limit is False and not self._warned_disk:
            self._warned_disk = True
            log.warning(
                "Disk sizes of instance types are not enforced: the engine's storage driver "
                "cannot limit a container's disk (overlay2 needs xfs with pquota)"
            )
        return info

    async def _reconcile(
        self, supervisor: ContainerSupervisor, entry: ClassImage
    ) -> ContainerInfo | None:
        """Before starting again after a start the engine did not answer, adopt the
        container that start made if it runs (start none), and remove any that does not."""
        key = (supervisor.class_name, supervisor.object_id)
        if key not in self._unsure:
            return None
        found = await self.runtime.list({**self.labels, labels.OBJECT: supervisor.object_id})
        self._unsure.discard(key)
        adopted = None
        for info in found:
            current = info.labels.get(labels.VERSION) == entry.version
            if adopted is None and current and info.status == "running":
                log.info(
                    "%s: adopting %s, started by the engine after it timed out",
                    supervisor,
                    info.name,
                )
                adopted = info
            else:
                await self.runtime.remove(info.id)
        return adopted

    async def apply_cpu_quota(self, supervisor: ContainerSupervisor) -> None:
        """End a start boost: the container gets its instance type's CPU quota."""
        info = supervisor.info
        vcpu = self.image_entry(supervisor.class_name).vcpu
        if info is None or vcpu is None:
            return
        await self.runtime.set_cpu_limit(info.id, vcpu)

    def exited(self, supervisor: ContainerSupervisor, container_id: str) -> None:
        self._capacity[supervisor.class_name].running.discard(container_id)

    def running_count(self, class_name: str) -> int:
        return len(self._capacity[class_name].running)

    def live_phases(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for supervisor in self._supervisors.values():
            if supervisor.phase is not Phase.STOPPED:
                counts[supervisor.phase.value] = counts.get(supervisor.phase.value, 0) + 1
        return counts


def _class_labels(class_name: str, wanted: Mapping[str, str]) -> dict[str, str]:
    """A class's own engine labels; Dockyard's prefix is refused, never overridden."""
    reserved = sorted(k for k in wanted if k.startswith(labels.RESERVED_PREFIX))
    if reserved:
        raise ContainerError(
            f"{class_name}: label(s) {', '.join(reserved)} use the reserved prefix "
            f"{labels.RESERVED_PREFIX!r}, which Dockyard's own labels use; rename them"
        )
    return {str(k): str(v) for k, v in wanted.items()}


def _harden(spec: ContainerSpec, options: ContainerOptions | None) -> ContainerSpec:
    """Apply what a class asked to loosen of the engine's hardening defaults."""
    if options is None:
        return spec
    return dataclasses.replace(
        spec,
        cap_add=options.cap_add,
        read_only=options.read_only_root,
        pids_limit=spec.pids_limit if options.pids_limit is None else options.pids_limit,
    )
