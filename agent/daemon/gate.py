"""The health gate a prepared version must pass before any request reaches it.

It runs the bundle's own sample inputs (`samples.npz`, first model) or, when
there are none, small synthesized ones, `runs` times through each prepared
model's engine, and requires finite outputs (a model that answers NaN to its
own samples is broken) and, when the manifest states an SLO, a p95 latency
within `slo_margin` times it. Blocking: run it off the event loop.
"""

from __future__ import annotations

import math
import time

import numpy as np

from bundle import TensorSpec

from ..dataplane import PreparedVersion, ServedModel
from .errors import UpdateRefused

GATE_BATCH = 1


def synthesize(specs: tuple[TensorSpec, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Small deterministic inputs: every dynamic dimension 1, values in [0, 1) (safe as indices too)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = tuple(d if isinstance(d, int) and d > 0 else GATE_BATCH for d in spec.shape)
        if spec.dtype == "string":
            feeds[spec.name] = np.full(shape, "a", dtype=object)
        elif spec.dtype == "bool":
            feeds[spec.name] = rng.random(shape) < 0.5
        elif np.issubdtype(np.dtype(spec.dtype), np.integer):
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        else:
            feeds[spec.name] = rng.random(shape).astype(spec.dtype)
    return feeds


def _samples(sm: ServedModel, first: bool) -> dict[str, np.ndarray]:
    manifest = sm.bundle.manifest
    if first and manifest.samples:
        with np.load(sm.bundle.path(manifest.samples), allow_pickle=False) as npz:
            feeds = {spec.name: np.asarray(npz[spec.name]) for spec in sm.runner.inputs if spec.name in npz.files}
        if len(feeds) == len(sm.runner.inputs):
            return feeds
    return synthesize(sm.runner.inputs)


def health_gate(prepared: PreparedVersion, runs: int, slo_margin: float) -> dict[str, float]:
    """p95 milliseconds per served model name; raises UpdateRefused("warmup", ...) on the first failure."""
    slo_ms = prepared.bundle.manifest.service.slo.p95_latency_ms
    out: dict[str, float] = {}
    for i, sm in enumerate(prepared.models):
        feeds = _samples(sm, i == 0)
        times: list[float] = []
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            try:
                result = sm.runner.run_sync(feeds)
            except Exception as e:
                raise UpdateRefused("warmup", f"{sm.name}@{sm.version} failed on its warm-up input: {e}") from e
            times.append(time.perf_counter() - t0)
            for name, value in result.outputs.items():
                arr = np.asarray(value)
                if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                    raise UpdateRefused("warmup", f"{sm.name}@{sm.version} output {name!r} is not finite "
                                                f"(NaN/Inf) on its warm-up input")
        p95_ms = float(np.percentile(times, 95)) * 1000.0
        if slo_ms is not None and math.isfinite(slo_ms) and p95_ms > slo_ms * slo_margin:
            raise UpdateRefused("warmup", f"{sm.name}@{sm.version} p95 {p95_ms:.2f} ms on its warm-up input is over "
                                        f"the SLO {slo_ms:g} ms x margin {slo_margin:g}")
        out[sm.name] = p95_ms
    return out
