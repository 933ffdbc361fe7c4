"""Every timeout, grace period, limit and path of one Dockyard node, in one typed object.

``Settings`` is built once (by ``dockyard dev`` from its flags, later by ``dockyard
serve``) and passed down; components read their part of it and hold no literals of
their own. Per-class values a user sets in code (``Container.stop_timeout`` and the
like) override the node's defaults where the class says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .gateway.limits import GatewayLimits

__all__ = ["ContainerSettings", "GatewayLimits", "NodeSettings", "ObjectSettings", "Settings"]


@dataclass(frozen=True, slots=True)
class ContainerSettings:
    # Platform stops (sleep, shutdown) send SIGTERM, then SIGKILL after this many seconds.
    # Cloudflare waits 15 minutes; a laptop's Ctrl-C cannot, so dev defaults to 10 s.
    stop_grace: float = 10.0
    # Starts per second per class before a start is answered with 429.
    starts_per_second: int = 100
    # At shutdown, how long to wait for an object to record how its container ended.
    exit_record_timeout: float = 5.0
    # Start a container without its CPU quota and apply the quota once its ports answer
    # (a class opts out with start_boost = False).
    start_boost: bool = True
    # While the engine does not answer: first retry after this, doubling up to the maximum.
    engine_retry_initial: float = 0.2
    engine_retry_max: float = 5.0
    # How long a short engine call (create, start, inspect, list, signal) may take before
    # the engine counts as unavailable (503); below the start budget, so a wedged engine
    # answers 503 rather than a start failure.
    engine_timeout: float = 5.0
    # Where the app's containers report to run: the container's DOCKYARD_LOCATION.
    location: str = "local"
    # Egress control (containers/egress_proxy.py): the port of the proxy on the container's
    # own loopback (HTTP_PROXY=http://127.0.0.1:<port>), and names the proxy resolves
    # itself, as curl --resolve: "host" or "host:port" -> "ip" or "ip:port". Only a name
    # mapped here may be forwarded to the host's own loopback.
    egress_proxy_port: int = 15080
    egress_hosts: Mapping[str, str] = field(default_factory=dict)
    # Reach container ports on the container's own loopback, through sockets made in its
    # network namespace (needs root beside a local engine; see containers/netns.py),
    # rather than through the engine's userland proxy at the published port.
    upstream_in_namespace: bool = True
    # Show error details (start failures, container output) to HTTP clients.
    # Off by default: clients see a short message and an error id; the log has the rest.
    debug_errors: bool = False


@dataclass(frozen=True, slots=True)
class ObjectSettings:
    # An instance with nothing in flight is evicted after this many idle seconds.
    idle_timeout: float = 70.0
    # How long stopping the host waits for calls in flight.
    stop_grace: float = 5.0
    # How long stop() lets ctx.wait_until work finish before cancelling it.
    wait_until_grace: float = 5.0
    # Object databases kept open at once (each holds 3 file descriptors with its WAL);
    # the least recently used idle one is closed beyond this and reopened on demand.
    max_open_files: int = 1000
    # Apply a migration's deleted_classes to classes that have stored objects. Dev asks
    # for it (--apply-deletions); a deploy to a node is the confirmation, as on Cloudflare.
    apply_deletions: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    # Where the app keeps its state (objects, locks); dev uses <project>/.dockyard.
    state_dir: Path | None = None
    containers: ContainerSettings = field(default_factory=ContainerSettings)
    objects: ObjectSettings = field(default_factory=ObjectSettings)
    gateway: GatewayLimits = field(default_factory=GatewayLimits)
    # `dockyard dev --test-scheduled`: GET /__scheduled?cron=... runs the worker's
    # scheduled handler at once (wrangler dev's route of the same name).
    test_scheduled: bool = False

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """What ``dockyard serve`` runs with: its listeners, folders and the platform's limits."""

    data_dir: Path
    # Application traffic, routed by Host; and the control plane (API, registry).
    listen: tuple[str, int] = ("127.0.0.1", 8787)
    admin: tuple[str, int] = ("127.0.0.1", 8788)
    # Apps answer at <name>.<domain>, as on workers.dev.
    domain: str = "localhost"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    admin_tls_cert: Path | None = None
    admin_tls_key: Path | None = None
    # A bundle upload larger than this is refused (413).
    max_upload_bytes: int = 512 * 1024 * 1024
    # A deploy that neither finishes nor aborts frees its app after this many seconds.
    deploy_lock_ttl: float = 900.0
    # SIGTERM: how long app processes get to finish requests in flight.
    drain_grace: float = 30.0
    # Platform stops of containers on a node (sleep, rollout): SIGTERM, SIGKILL after this.
    # Cloudflare waits 15 minutes; 30 s keeps a rollout of many instances moving while
    # giving a web server time to finish its requests. Per class: stop_timeout.
    container_stop_grace: float = 30.0
    # A crashed app process is restarted after this, doubling up to the maximum.
    restart_initial: float = 0.5
    restart_max: float = 30.0
    # Run each app's process as its own uid when the node runs as root.
    separate_users: bool = True
    # Logs are kept this long, and the store at most this big (oldest go first).
    log_retention: float = 7 * 86400.0
    log_max_bytes: int = 1 << 30
    # How often running containers' CPU, memory and network counters are read.
    usage_interval: float = 5.0
