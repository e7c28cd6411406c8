"""Serving metrics: Prometheus series per model version, and a tail-latency window.

Everything lives on a private CollectorRegistry so two data planes in one
process (tests, an agent running two servers) never collide, and `/metrics`
shows only Outpost's series (transports register their own collectors on it).

The per-request path must stay cheap (FIELD-NOTES: on a small model the whole
request is a few hundred microseconds): prometheus-client's metric objects
take a lock per update, about a dozen per request. So a model's counters and
histograms are plain numbers updated on the event loop thread and handed to
prometheus-client by one collector at scrape time; a scrape from another
thread may see a request half-counted, never a corrupted value.

The tail window keeps recent latencies in memory for the fleet report, which
wants p50/p95/p99 of the last minute rather than histogram buckets.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LABELS = ("model", "version", "backend")


@dataclass(frozen=True)
class TailLatency:
    window_s: float
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class TailWindow:
    """Latencies of the last `window_s` seconds (at most `max_samples`, oldest dropped first)."""

    def __init__(self, window_s: float = 60.0, max_samples: int = 200_000) -> None:
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def add(self, latency_s: float, now: float) -> None:
        # no lock: deque.append is atomic, and snapshot copies the deque in one C call (list())
        self._samples.append((now, latency_s))

    def snapshot(self, now: float | None = None) -> TailLatency:
        cutoff = (time.monotonic() if now is None else now) - self.window_s
        with self._lock:  # between snapshots: two trimming at once could pop a fresh sample
            while self._samples and self._samples[0][0] < cutoff:
                self._samples.popleft()
            samples = list(self._samples)
        values = np.array([v for _, v in samples], dtype=np.float64)
        if values.size == 0:
            return TailLatency(self.window_s, 0, None, None, None)
        p50, p95, p99 = np.percentile(values, [50, 95, 99]) * 1000.0
        return TailLatency(self.window_s, int(values.size), float(p50), float(p95), float(p99))


class Histo:
    """A lock-free histogram for one thread (the event loop); `le` buckets like Prometheus."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family_values(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


class ModelMetrics:
    """The series of one model version, as plain numbers."""

    def __init__(self, model: str, version: str, backend: str, window_s: float) -> None:
        self.labels = [model, version, backend]
        self.requests = 0
        self.failures: dict[str, int] = {}
        self.queue_s = Histo(LATENCY_BUCKETS_S)
        self.compute_s = Histo(LATENCY_BUCKETS_S)
        self.total_s = Histo(LATENCY_BUCKETS_S)
        self.batch_size = Histo(BATCH_BUCKETS)
        self.in_flight = 0
        self.non_finite = 0
        self.queue_depth: Callable[[], float] = lambda: 0.0
        self.tail = TailWindow(window_s)

    def observe_success(self, queue_s: float, compute_s: float, total_s: float, now: float) -> None:
        # Histo.observe three times, inline (this runs per request; the buckets are the same)
        self.requests += 1
        bounds = LATENCY_BUCKETS_S
        h = self.queue_s
        h.counts[bisect.bisect_left(bounds, queue_s)] += 1
        h.sum += queue_s
        h = self.compute_s
        h.counts[bisect.bisect_left(bounds, compute_s)] += 1
        h.sum += compute_s
        h = self.total_s
        h.counts[bisect.bisect_left(bounds, total_s)] += 1
        h.sum += total_s
        self.tail._samples.append((now, total_s))  # TailWindow.add

    def observe_failure(self, reason: str) -> None:
        self.requests += 1
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def observe_batch(self, items: int) -> None:
        self.batch_size.observe(items)

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth = depth


class _ServingCollector(Collector):
    def __init__(self, owner: ServingMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        models = list(self._owner.models)
        req = CounterMetricFamily("outpost_requests", "Inference requests answered (success or failure).",
                                  labels=LABELS)
        fail = CounterMetricFamily("outpost_request_failures", "Inference requests that failed, by reason.",
                                   labels=(*LABELS, "reason"))
        nonfinite = CounterMetricFamily("outpost_nonfinite_output_values", "NaN/Inf values in outputs.",
                                        labels=LABELS)
        in_flight = GaugeMetricFamily("outpost_in_flight_requests", "Requests being served now.", labels=LABELS)
        depth = GaugeMetricFamily("outpost_queue_depth", "Requests waiting in the batch queue.", labels=LABELS)
        histos = {
            "queue_s": HistogramMetricFamily("outpost_queue_seconds", "Time a request waited in the batch queue.",
                                             labels=LABELS),
            "compute_s": HistogramMetricFamily("outpost_compute_seconds",
                                               "Engine time of the batch a request ran in.", labels=LABELS),
            "total_s": HistogramMetricFamily("outpost_request_seconds",
                                             "Time from validation to answer, per request.", labels=LABELS),
            "batch_size": HistogramMetricFamily("outpost_batch_size", "Items per engine batch.", labels=LABELS),
        }
        for m in models:
            req.add_metric(m.labels, m.requests)
            for reason, n in list(m.failures.items()):
                fail.add_metric([*m.labels, reason], n)
            nonfinite.add_metric(m.labels, m.non_finite)
            in_flight.add_metric(m.labels, m.in_flight)
            depth.add_metric(m.labels, float(m.queue_depth()))
            for attr, family in histos.items():
                h: Histo = getattr(m, attr)
                family.add_metric(m.labels, h.family_values(), h.sum)
        yield from (req, fail, *histos.values(), in_flight, depth, nonfinite)
        switches = CounterMetricFamily("outpost_model_switches",
                                       "Times requests without a version were pointed at another version.",
                                       labels=("model", "active_version"))
        for model, active, count in self._owner.switches():
            switches.add_metric([model, active], count)
        yield switches


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, window_s: float = 60.0) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.window_s = window_s
        self.models: list[ModelMetrics] = []
        self.switches: Callable[[], list[tuple[str, str, int]]] = list
        self.registry.register(_ServingCollector(self))

    def new_model(self, model: str, version: str, backend: str) -> ModelMetrics:
        """Series of a version being prepared: not exported until `add` (when it starts serving)."""
        return ModelMetrics(model, version, backend, self.window_s)

    def add(self, m: ModelMetrics) -> None:
        if m not in self.models:
            self.models.append(m)

    def for_model(self, model: str, version: str, backend: str) -> ModelMetrics:
        m = self.new_model(model, version, backend)
        self.add(m)
        return m

    def track_switches(self, samples: Callable[[], list[tuple[str, str, int]]]) -> None:
        """(model, active version, switch count) per model, read at scrape time."""
        self.switches = samples

    def remove(self, m: ModelMetrics) -> None:
        """Drop an unloaded version's series."""
        if m in self.models:
            self.models.remove(m)

    def exposition(self) -> tuple[bytes, str]:
        """The text format body and its content type, for any transport to serve."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
