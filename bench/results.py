"""What each scenario measured: plain data, filled by bench.scenarios, read by bench.report."""

from __future__ import annotations

from dataclasses import dataclass, field

from .stats import median, percentile
from .wrk import WrkResult

__all__ = [
    "BoostResult",
    "BurstResult",
    "ColdResult",
    "FanoutResult",
    "MemoryResult",
    "ProfileEntry",
    "Results",
    "WakeResult",
    "WarmRow",
]

PATHS = ("direct", "nginx", "dockyard")


@dataclass(frozen=True, slots=True)
class WarmRow:
    connections: int
    path: str  # one of PATHS
    wrk: WrkResult


@dataclass(frozen=True, slots=True)
class ColdResult:
    dockyard_ms: list[float]  # first request to a stopped object -> response
    docker_run_ms: list[float]  # docker run -> first HTTP response, same image

    @property
    def dockyard_median(self) -> float:
        return median(self.dockyard_ms)

    @property
    def docker_run_median(self) -> float:
        return median(self.docker_run_ms)


@dataclass(frozen=True, slots=True)
class BoostResult:
    """Cold starts of an app that works about 1 s at boot, on instance type lite."""

    boosted_ms: list[float]  # Dockyard with the start boost: first request -> response
    quota_ms: list[float]  # Dockyard, the class opted out: 1/16 vCPU from the start
    docker_run_ms: list[float]  # docker run (no limits) -> first HTTP response
    boot_cpu_s: list[float] = field(default_factory=list)  # CPU the work took, per docker run


@dataclass(frozen=True, slots=True)
class WakeResult:
    samples_ms: list[float]  # first request to a paused object -> response

    @property
    def p50(self) -> float:
        return median(self.samples_ms)


@dataclass(frozen=True, slots=True)
class BurstResult:
    requests: int
    errors: int  # non-200 answers and failed requests
    containers_started: int  # start events the engine recorded for the object
    latencies_ms: list[float]

    @property
    def p50(self) -> float:
        return median(self.latencies_ms)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)


@dataclass(frozen=True, slots=True)
class FanoutResult:
    objects: int
    dockyard_ms: float  # all distinct cold objects answered
    docker_run_ms: float  # all parallel docker runs answered
    dockyard_errors: int


@dataclass(frozen=True, slots=True)
class MemoryResult:
    objects: int
    baseline_kib: int
    touched_kib: int  # right after touching every object (all live)
    evicted_kib: int | None  # once they were evicted; None when not waited for
    live_after: int | None  # live instances reported after eviction, if the host says
    second_kib: int | None = None  # after touching and evicting as many other objects

    @property
    def per_object_live(self) -> float:
        return (self.touched_kib - self.baseline_kib) * 1024 / self.objects

    @property
    def per_object_evicted(self) -> float | None:
        if self.evicted_kib is None:
            return None
        return (self.evicted_kib - self.baseline_kib) * 1024 / self.objects

    @property
    def per_object_second(self) -> float | None:
        """Growth per object in the second round: about 0 unless evicted objects leak."""
        if self.second_kib is None or self.evicted_kib is None:
            return None
        return (self.second_kib - self.evicted_kib) * 1024 / self.objects


@dataclass(frozen=True, slots=True)
class ProfileEntry:
    share: float  # of the busiest thread's samples, 0..1
    frame: str


@dataclass
class Results:
    mode: str  # "quick" or "full"
    started_utc: str
    machine: dict[str, str]
    wrk_seconds: float
    warm: list[WarmRow] = field(default_factory=list)
    cold: ColdResult | None = None
    boost: BoostResult | None = None
    wake: WakeResult | None = None
    burst: BurstResult | None = None
    fanout: FanoutResult | None = None
    memory: MemoryResult | None = None
    profile_self: list[ProfileEntry] = field(default_factory=list)
    profile_total: list[ProfileEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def warm_row(self, path: str, connections: int) -> WrkResult | None:
        for row in self.warm:
            if row.path == path and row.connections == connections:
                return row.wrk
        return None
