"""Prometheus series: what an app process measures, and how a node shows all of them.

Each app process (and ``dockyard dev``) keeps its own ``AppMetrics`` in its own
registry: requests by status class, latency of the whole request (until the response
head) and of the container hop, cold starts, start failures, containers by state, live
objects and storage bytes. The node asks every app process for its text on the control
socket and ``merge_expositions`` joins them with the node's own series (rollouts, engine
readings per container class, the log store) into one ``/metrics``.

Label values are bounded: app, class, status class (2xx...), state, failure kind. Object
ids never become label values (one series per object would grow without bound).

Just over 400 lines: the app's series, the request path's lock-free histogram and the
node's merge read as one vocabulary of series names; splitting them would scatter it.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .records import LogRecord

__all__ = [
    "CONTENT_TYPE",
    "AppMetrics",
    "NodeCollector",
    "RequestRates",
    "StaticCollector",
    "merge_expositions",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The ``_created`` timestamps double every counter's output and no query here uses them.
disable_created_metrics()

# Seconds. The request path is sub-millisecond warm; cold starts take seconds.
REQUEST_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
COLD_START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

# (state name, phase) pairs a container can be in, so every state has a series (a zero
# is a reading; a missing series is not).
CONTAINER_STATES = ("starting", "running", "healthy", "paused", "stopping", "unknown")


class _Histogram:
    """A histogram on the request path: two list updates per observation, no lock.

    prometheus_client's own takes a lock and several calls per ``observe`` (3.7 µs for a
    request's two series on an AMD EPYC, against 0.5 µs here). Every observation comes
    from the event loop's thread, so nothing else writes these lists; a scrape reads them.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by upper bound, as the exposition format has them."""
        cumulative = 0
        rows = []
        bounds = (*map(floatToGoString, self.bounds), "+Inf")
        for bound, count in zip(bounds, self.counts, strict=True):
            cumulative += count
            rows.append((bound, float(cumulative)))
        return rows


class AppMetrics:
    """One app's series. ``request`` and ``container_request`` are on the request path:
    plain counters and ``_Histogram``s, read into families when scraped."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = [0] * len(STATUS_CLASSES)
        self._latency = _Histogram(REQUEST_BUCKETS)
        self._hops: dict[str, _Histogram] = {}
        self.registry.register(_RequestCollector(self))
        self._cold_starts = Histogram(
            "dockyard_cold_start_duration_seconds",
            "Cold starts: from asking the engine to run a container to its ports answering",
            ["app", "class_name"],
            buckets=COLD_START_BUCKETS,
            registry=self.registry,
        )
        self._failures = Counter(
            "dockyard_container_start_failures",
            "Container starts that failed, by kind (engine, image, capacity, rate, start, timeout)",
            ["app", "class_name", "reason"],
            registry=self.registry,
        )
        self._stops = Counter(
            "dockyard_container_stops",
            "Container runs that ended, by Dockyard's reason (exit, oom, sleep, ...)",
            ["app", "class_name", "reason"],
            registry=self.registry,
        )

    def request(self, status: int, seconds: float) -> None:
        self._requests[min(max(status // 100, 1), 5) - 1] += 1
        self._latency.observe(seconds)

    def container_request(self, class_name: str, seconds: float) -> None:
        hop = self._hops.get(class_name)
        if hop is None:
            hop = self._hops[class_name] = _Histogram(REQUEST_BUCKETS)
        hop.observe(seconds)

    def emit(self, record: LogRecord) -> None:
        """A ``LogSink``: platform events count as cold starts, failures and stops."""
        if record.source != "platform":
            return
        fields = record.fields
        if record.event == "container.start":
            seconds = float(fields.get("cold_start_ms", 0.0)) / 1000
            self._cold_starts.labels(self.app, record.class_name).observe(seconds)
        elif record.event == "container.start_failed":
            reason = str(fields.get("reason", "error"))
            self._failures.labels(self.app, record.class_name, reason).inc()
        elif record.event in ("container.stop", "container.oom"):
            detail = str(fields.get("detail", "exit"))
            self._stops.labels(self.app, record.class_name, detail).inc()

    def watch(
        self,
        *,
        containers: Callable[[], Iterable[tuple[str, str]]],
        objects: Callable[[], dict[str, int]],
        storage: Path | None,
    ) -> None:
        """Series read at scrape time: ``containers()`` gives (class, phase) for each
        object's container, ``objects()`` live objects by class, ``storage`` the folder
        whose files are the app's storage."""
        self.registry.register(_LiveCollector(self.app, containers, objects, storage))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RequestCollector(Collector):
    """The request path's counters and histograms of one ``AppMetrics``, as families."""

    def __init__(self, metrics: AppMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        app = metrics.app
        requests = CounterMetricFamily(
            "dockyard_requests",
            "Requests the app answered, by status class",
            labels=["app", "code"],
        )
        for code, count in zip(STATUS_CLASSES, metrics._requests, strict=True):
            requests.add_metric([app, code], float(count))
        yield requests
        latency = HistogramMetricFamily(
            "dockyard_request_duration_seconds",
            "Time from a request's head to its response's head, worker included",
            labels=["app"],
        )
        latency.add_metric([app], metrics._latency.buckets(), metrics._latency.total)
        yield latency
        hop = HistogramMetricFamily(
            "dockyard_container_request_duration_seconds",
            "Time from forwarding a request to a container to its response's head",
            labels=["app", "class_name"],
        )
        for class_name, histogram in sorted(metrics._hops.items()):
            hop.add_metric([app, class_name], histogram.buckets(), histogram.total)
        yield hop


class _LiveCollector(Collector):
    def __init__(
        self,
        app: str,
        containers: Callable[[], Iterable[tuple[str, str]]],
        objects: Callable[[], dict[str, int]],
        storage: Path | None,
    ) -> None:
        self.app = app
        self.containers = containers
        self.objects = objects
        self.storage = storage

    def collect(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily(
            "dockyard_containers",
            "Containers by class and state (stopped ones are not counted)",
            labels=["app", "class_name", "state"],
        )
        counts: dict[tuple[str, str], int] = {}
        classes: set[str] = set()
        for class_name, phase in self.containers():
            classes.add(class_name)
            if phase != "stopped":
                counts[(class_name, phase)] = counts.get((class_name, phase), 0) + 1
        for class_name in sorted(classes):
            for state in CONTAINER_STATES:
                by_state.add_metric(
                    [self.app, class_name, state], counts.get((class_name, state), 0)
                )
        yield by_state
        live = GaugeMetricFamily(
            "dockyard_objects_live",
            "Durable Object instances in memory, by class",
            labels=["app", "class_name"],
        )
        for class_name, count in sorted(self.objects().items()):
            live.add_metric([self.app, class_name], count)
        yield live
        if self.storage is not None:
            stored = GaugeMetricFamily(
                "dockyard_storage_bytes",
                "Bytes of the app's storage files (objects, KV, D1)",
                labels=["app"],
            )
            stored.add_metric([self.app], _folder_bytes(self.storage))
            yield stored


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue  # removed while we walked
    return total


class StaticCollector(Collector):
    """Families read elsewhere (another process's exposition), yielded as they are."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge_expositions(own: CollectorRegistry, others: Iterable[str]) -> bytes:
    """One exposition from the node's registry and the app processes' texts: families of
    the same name (every app process has ``dockyard_requests``) become one family, as the
    format requires. A text that does not parse is skipped (its process is replaced
    soon); it never breaks the node's own series."""
    families: dict[str, Metric] = {}
    for text in others:
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for family in parsed:
            into = families.get(family.name)
            if into is None:
                families[family.name] = family
            elif into.type == family.type:
                into.samples.extend(family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StaticCollector([*own.collect(), *families.values()]))
    return generate_latest(registry)


class NodeCollector(Collector):
    """The node's own series, read at scrape time: rollouts under way, the log store, and
    the engine's readings per app and class. ``containers()`` gives one dict per (app,
    class): ``cpu_seconds`` and ``tx_bytes`` summed over every metered run (counters),
    ``memory_bytes`` over the runs live now."""

    def __init__(
        self,
        *,
        rollouts: Callable[[], int],
        containers: Callable[[], Iterable[dict[str, Any]]],
        logs: Callable[[], dict[str, int]],
    ) -> None:
        self.rollouts = rollouts
        self.containers = containers
        self.logs = logs

    def collect(self) -> Iterator[Metric]:
        rollouts = GaugeMetricFamily("dockyard_rollouts_in_progress", "Rollouts running now")
        rollouts.add_metric([], self.rollouts())
        yield rollouts
        cpu = CounterMetricFamily(
            "dockyard_container_cpu_seconds",
            "CPU time of every container run (from their cgroups), by class",
            labels=["app", "class_name"],
        )
        memory = GaugeMetricFamily(
            "dockyard_container_memory_bytes",
            "Memory the containers running now use, by class",
            labels=["app", "class_name"],
        )
        sent = CounterMetricFamily(
            "dockyard_container_network_transmit_bytes",
            "Bytes every container run sent (egress), by class",
            labels=["app", "class_name"],
        )
        for reading in sorted(
            self.containers(), key=lambda r: (r.get("app", ""), r.get("class_name", ""))
        ):
            labels = [str(reading.get("app", "")), str(reading.get("class_name", ""))]
            cpu.add_metric(labels, float(reading.get("cpu_seconds", 0.0)))
            memory.add_metric(labels, float(reading.get("memory_bytes", 0)))
            sent.add_metric(labels, float(reading.get("tx_bytes", 0)))
        yield from (cpu, memory, sent)
        stats = self.logs()
        for name, text in (
            ("records", "Log records stored"),
            ("bytes", "Bytes the log store uses"),
            ("dropped", "Log records dropped (a sink that could not keep up)"),
        ):
            family = GaugeMetricFamily(f"dockyard_log_{name}", text)
            family.add_metric([], float(stats.get(name, 0)))
            yield family


class RequestRates:
    """Requests per minute and the share of 5xx per app, from readings of its
    ``dockyard_requests`` counters: the change between the oldest reading kept (at most
    ``window`` seconds old) and the newest."""

    def __init__(self, window: float = 300.0) -> None:
        self.window = window
        # app -> (monotonic time, requests, 5xx), oldest first
        self._readings: dict[str, deque[tuple[float, float, float]]] = {}

    def update(self, app: str, exposition: str | None) -> tuple[float, float]:
        """Add a reading (None: the app could not be read now) and return the rates."""
        readings = self._readings.setdefault(app, deque())
        now = time.monotonic()
        total, failed = _request_counts(exposition) if exposition else (None, 0.0)
        if total is not None:
            if readings and total < readings[-1][1]:
                readings.clear()  # a new process: its counters start again
            readings.append((now, total, failed))
        while readings and now - readings[0][0] > self.window:
            readings.popleft()
        if len(readings) < 2:
            return 0.0, 0.0
        (t0, n0, e0), (t1, n1, e1) = readings[0], readings[-1]
        requests = n1 - n0
        minutes = max(t1 - t0, 1.0) / 60
        return requests / minutes, ((e1 - e0) / requests if requests else 0.0)


def _request_counts(text: str) -> tuple[float | None, float]:
    total: float | None = None
    failed = 0.0
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return None, 0.0
    for family in families:
        if family.name != "dockyard_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total = (total or 0.0) + sample.value
                if sample.labels.get("code") == "5xx":
                    failed += sample.value
    return total, failed
