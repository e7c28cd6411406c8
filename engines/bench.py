"""Latency and throughput of a loaded engine, optionally side by side with a bare ORT session.

The baseline is what a user would write by hand: `onnxruntime.InferenceSession`
on the bundle's original model, full graph optimization, the same thread and
spinning settings as the engine, fed the same arrays. Engine and baseline
are timed in alternating rounds, so drift on a shared machine (thermal,
neighbours) hits both alike; each figure is a median over per-call times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bundle import TensorSpec

from .base import Engine, EngineOptions
from .parity import generate_inputs
from .shapes import DimRange, ShapeProfile

Call = Callable[[], object]


@dataclass(frozen=True)
class BenchRow:
    batch: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    items_per_s: float
    baseline_p50_ms: float | None = None
    #: engine p50 / baseline p50 (1.00 = the engine layer adds nothing)
    ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def feeds_for_batch(specs: Sequence[TensorSpec], profile: ShapeProfile, batch: int) -> dict[str, np.ndarray]:
    """Generated inputs whose batch dim is `batch` (other dynamic dims at their sample size)."""
    dims = tuple((n, DimRange(batch, batch, batch, True) if r.batch else r) for n, r in profile.dims)
    return generate_inputs(tuple(specs), ShapeProfile(dims))


def bare_ort_call(model_path: str, options: EngineOptions, feeds: Mapping[str, np.ndarray]) -> Call:
    from .ort_common import import_ort, session_options

    ort = import_ort()
    session = ort.InferenceSession(model_path, sess_options=session_options(options, "all"),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    arrays = dict(feeds)
    return lambda: session.run(names, arrays)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(calls: Mapping[str, Call], iterations: int, warmup: int, rounds: int = 10) -> dict[str, list[float]]:
    """Per-call seconds for each named call, in `rounds` alternating blocks."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_round = max(1, iterations // rounds)
    clock = time.perf_counter
    for _ in range(rounds):
        for name, call in calls.items():
            bucket = times[name]
            for _ in range(per_round):
                t0 = clock()
                call()
                bucket.append(clock() - t0)
    return times


def bench(engine: Engine, profile: ShapeProfile, batches: Sequence[int], iterations: int = 200, warmup: int = 20,
          baseline: Callable[[Mapping[str, np.ndarray]], Call] | None = None) -> list[BenchRow]:
    rows = []
    for batch in batches:
        feeds = feeds_for_batch(engine.inputs, profile, batch)
        calls: dict[str, Call] = {"engine": lambda f=feeds: engine.infer(f)}  # type: ignore[misc]
        if baseline is not None:
            calls["baseline"] = baseline(feeds)
        times = measure(calls, iterations, warmup)
        ms = [t * 1000 for t in times["engine"]]
        p50 = statistics.median(ms)
        base = statistics.median([t * 1000 for t in times["baseline"]]) if "baseline" in times else None
        rows.append(BenchRow(batch, len(ms), p50, _percentile(ms, 90), _percentile(ms, 99),
                             batch * 1000.0 / p50, base, p50 / base if base else None))
    return rows
