"""Parity check: a new engine must agree with ONNX Runtime on the CPU before anyone uses it.

The reference is the bundle's original model in ORT on the CPU with graph
optimization off: the plainest reading of the ONNX semantics we have, and
independent of every optimization a backend (ORT's own optimizer included)
applies. Inputs are the bundle's `samples.npz` when it covers every input,
otherwise generated from the signature with a fixed seed at the profile's
"sample" sizes.

Tolerance depends on the precision the engine was built for: elementwise
|actual - expected| <= atol * scale + rtol * |expected|, where scale is the
largest magnitude in the expected output (so that atol means "relative to the
output's range", and a tiny logit next to large ones is not held to 1e-4).
Integer, bool and string outputs must match exactly; NaN must match NaN.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from bundle import TensorSpec

from .base import EngineOptions
from .errors import ParityError
from .shapes import ShapeProfile

#: precision -> (rtol, atol)
TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (1e-3, 1e-4), "fp16": (2e-2, 1e-2)}
SEED = 20240601
_WORDS = ("Edge", "INFERENCE", "outpost", "Model", "TensorRT", "ünïcode")


@dataclass(frozen=True)
class ParityReport:
    source: str  # "samples" | "generated"
    precision: str
    rtol: float
    atol: float
    #: output name -> worst |actual - expected| (0 for exact dtypes)
    max_abs_error: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def generate_inputs(specs: tuple[TensorSpec, ...], profile: ShapeProfile, seed: int = SEED) -> dict[str, np.ndarray]:
    """Inputs for every spec at the profile's sample sizes; values stay small so that
    integer inputs used as indices or counts remain in range for most models."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = profile.shape(spec, "sample")
        if spec.dtype == "string":
            feeds[spec.name] = rng.choice(np.array(_WORDS, dtype=object), size=shape)
        elif spec.dtype == "bool":
            feeds[spec.name] = rng.random(shape) < 0.5
        elif np.issubdtype(np.dtype(spec.dtype), np.integer):
            feeds[spec.name] = rng.integers(0, 4, size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def sample_inputs(specs: tuple[TensorSpec, ...], profile: ShapeProfile,
                  samples_path: str | os.PathLike[str] | None) -> tuple[dict[str, np.ndarray], str]:
    if samples_path is not None:
        with np.load(samples_path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
        if {s.name for s in specs} <= arrays.keys():
            return {s.name: arrays[s.name] for s in specs}, "samples"
    return generate_inputs(specs, profile), "generated"


def reference_outputs(model_path: str, feeds: Mapping[str, np.ndarray],
                      options: EngineOptions | None = None) -> dict[str, np.ndarray]:
    from .ort_common import import_ort, session_options

    ort = import_ort()
    session = ort.InferenceSession(model_path, sess_options=session_options(options or EngineOptions(), "disable"),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def compare(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], precision: str,
            backend: str = "engine", source: str = "generated") -> ParityReport:
    """Raise `ParityError` naming the first output that disagrees; else report the worst errors."""
    rtol, atol = TOLERANCES.get(precision, TOLERANCES["fp32"])
    worst: dict[str, float] = {}
    for name, exp in expected.items():
        if name not in actual:
            raise ParityError(f"{backend}: output {name!r} is missing")
        got = np.asarray(actual[name])
        exp = np.asarray(exp)
        if got.shape != exp.shape:
            raise ParityError(f"{backend}: output {name!r} has shape {got.shape}, the reference {exp.shape}")
        if exp.dtype.kind in "fc":
            worst[name] = _check_float(name, got, exp, rtol, atol, backend)
        else:
            if not np.array_equal(got, exp):
                bad = int(np.count_nonzero(got != exp))
                raise ParityError(f"{backend}: output {name!r} differs from the reference in {bad} of "
                                  f"{exp.size} elements (exact match required for {exp.dtype})")
            worst[name] = 0.0
    return ParityReport(source, precision, rtol, atol, worst)


def _check_float(name: str, got: np.ndarray, exp: np.ndarray, rtol: float, atol: float, backend: str) -> float:
    g, e = got.astype(np.float64), exp.astype(np.float64)
    nan_g, nan_e = np.isnan(g), np.isnan(e)
    if not np.array_equal(nan_g, nan_e):
        raise ParityError(f"{backend}: output {name!r} has NaN where the reference does not (or the reverse)")
    finite = ~nan_e
    if not finite.any():
        return 0.0
    diff = np.abs(g[finite] - e[finite])
    scale = max(1.0, float(np.max(np.abs(e[finite]))))
    limit = atol * scale + rtol * np.abs(e[finite])
    worst = float(np.max(diff)) if diff.size else 0.0
    over = diff > limit
    if np.any(over):
        raise ParityError(f"{backend}: output {name!r} differs from the ORT CPU reference: max |error| {worst:.3g} "
                          f"in {int(np.count_nonzero(over))} of {diff.size} elements (rtol {rtol}, atol {atol} "
                          f"x {scale:.3g})")
    return worst
