"""Parity check: a new engine must agree with ONNX Runtime on the CPU before anyone uses it.

The reference is the bundle's original model in ORT on the CPU with graph
optimization off: the plainest reading of the ONNX semantics we have, and
independent of every optimization a backend (ORT's own optimizer included)
applies. Inputs are the bundle's `samples.npz` when it covers every input,
otherwise generated from the signature with a fixed seed (`candidate_inputs`).

Synthesized inputs can be wrong for a model (an STFT needs a minimum length):
when the *reference* rejects them, that is a fact about the inputs, so the
next candidate sizes are tried, and when none is accepted the engine is still
accepted, its report saying "not checked" and why (`ParityReport.checked`).
When the reference accepts inputs the engine rejects, the engine failed.

Tolerance depends on the precision the engine was built for: elementwise
|actual - expected| <= atol * scale + rtol * |expected|, where scale is the
largest magnitude in the expected output (so that atol means "relative to the
output's range", and a tiny logit next to large ones is not held to 1e-4).
Integer, bool and string outputs must match exactly; NaN must match NaN.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from bundle import TensorSpec

from .base import EngineOptions
from .errors import ParityError
from .nontensor import as_tensors, converters
from .shapes import ShapeProfile

#: precision -> (rtol, atol)
TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (1e-3, 1e-4), "fp16": (2e-2, 1e-2)}
SEED = 20240601
_WORDS = ("Edge", "INFERENCE", "outpost", "Model", "TensorRT", "ünïcode")


#: what a parity check that could not run says (engine inspect, model metadata, the log)
UNCHECKED = ("not checked: the model rejected synthesized inputs ({reason}); "
             "add sample inputs with `--samples`")
#: sizes tried, in order, for dynamic dims other than the batch once the first guess is rejected:
#: a spatial size (CNNs with several stride-2 stages), then sequence lengths (an STFT's reflect
#: padding needs inputs longer than the pad); each is clamped into the dim's profile range
RETRY_SIZES = (224, 1024, 16000)
#: a synthesized input set larger than this (elements, all inputs together) is not tried
MAX_SYNTH_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ParityReport:
    source: str  # "samples" | "generated"
    precision: str
    rtol: float
    atol: float
    #: output name -> worst |actual - expected| (0 for exact dtypes)
    max_abs_error: dict[str, float]
    #: False when no input could be found that the reference model accepts (`note` says why)
    checked: bool = True
    note: str | None = None
    #: the size of each named dim in the inputs that were checked (warm-up reuses them)
    dims: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def unchecked(cls, precision: str, reason: str) -> ParityReport:
        rtol, atol = TOLERANCES.get(precision, TOLERANCES["fp32"])
        return cls("generated", precision, rtol, atol, {}, False, UNCHECKED.format(reason=reason))


@dataclass(frozen=True)
class Inputs:
    feeds: dict[str, np.ndarray]
    source: str  # "samples" | "generated"
    dims: dict[str, int]


def generate_inputs(specs: tuple[TensorSpec, ...], profile: ShapeProfile, seed: int = SEED,
                    dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Inputs for every spec at the profile's sample sizes (or at `dims`); values stay small so that
    integer inputs used as indices or counts remain in range for most models."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = _shape(spec, profile, dims or {})
        if spec.dtype == "string":
            feeds[spec.name] = rng.choice(np.array(_WORDS, dtype=object), size=shape)
        elif spec.dtype == "bool":
            feeds[spec.name] = rng.random(shape) < 0.5
        elif np.issubdtype(np.dtype(spec.dtype), np.integer):
            feeds[spec.name] = rng.integers(0, 4, size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def _shape(spec: TensorSpec, profile: ShapeProfile, dims: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else int(dims.get(d, profile.range(d).sample)) for d in spec.shape)


def _dims_of(specs: tuple[TensorSpec, ...], arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Sizes of the named dims, read from the sample arrays that match their spec's rank."""
    dims: dict[str, int] = {}
    for spec in specs:
        arr = arrays.get(spec.name)
        if arr is not None and arr.ndim == len(spec.shape):
            for d, n in zip(spec.shape, arr.shape, strict=True):
                if isinstance(d, str) and n > 0:
                    dims.setdefault(d, int(n))
    return dims


def candidate_inputs(specs: tuple[TensorSpec, ...], profile: ShapeProfile,
                     samples_path: str | os.PathLike[str] | None) -> Iterator[Inputs]:
    """Inputs to check an engine on, best first: the bundle's samples when they cover every input;
    else synthesized ones (sizes of dims named in partial samples first, then the profile's sample
    sizes, then `RETRY_SIZES`), each distinct and bounded in size."""
    arrays: dict[str, np.ndarray] = {}
    if samples_path is not None:
        with np.load(samples_path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
        if {s.name for s in specs} <= arrays.keys():
            yield Inputs({s.name: arrays[s.name] for s in specs}, "samples", _dims_of(specs, arrays))
            return
    known = _dims_of(specs, arrays)
    tried: set[tuple[tuple[str, int], ...]] = set()
    for size in (None, *RETRY_SIZES):
        dims = {}
        for name, r in profile.dims:
            want = known.get(name, r.sample if size is None or r.batch else size)
            dims[name] = max(r.min, min(r.max, want))
        key = tuple(sorted(dims.items()))
        elements = sum(int(np.prod(_shape(s, profile, dims))) for s in specs)
        if key in tried or elements > MAX_SYNTH_ELEMENTS:
            continue
        tried.add(key)
        feeds = generate_inputs(specs, profile, dims=dims)
        for spec in specs:  # partial samples: their arrays where they fit the chosen sizes
            arr = arrays.get(spec.name)
            if arr is not None and arr.shape == feeds[spec.name].shape and arr.dtype == feeds[spec.name].dtype:
                feeds[spec.name] = arr
        yield Inputs(feeds, "generated", dims)


class Reference:
    """The bundle's model in ORT on the CPU with graph optimization off (the module docstring says why)."""

    def __init__(self, model_path: str, outputs: tuple[TensorSpec, ...] = (),
                 options: EngineOptions | None = None) -> None:
        from .ort_common import import_ort, session_options

        ort = import_ort()
        so = session_options(options or EngineOptions(), "disable")
        so.log_severity_level = 4  # inputs it rejects are expected here, and reported by the caller
        self._session = ort.InferenceSession(model_path, sess_options=so, providers=["CPUExecutionProvider"])
        self._names = [o.name for o in self._session.get_outputs()]
        self._convert = converters(outputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The reference outputs; raises whatever ORT raises when the model rejects the inputs."""
        values = dict(zip(self._names, self._session.run(self._names, dict(feeds)), strict=True))
        return as_tensors(values, self._convert)


def reference_outputs(model_path: str, feeds: Mapping[str, np.ndarray], options: EngineOptions | None = None,
                      outputs: tuple[TensorSpec, ...] = ()) -> dict[str, np.ndarray]:
    return Reference(model_path, outputs, options).run(feeds)


def compare(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], precision: str,
            backend: str = "engine", source: str = "generated", dims: Mapping[str, int] | None = None) -> ParityReport:
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
    return ParityReport(source, precision, rtol, atol, worst, dims=dict(dims or {}))


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
