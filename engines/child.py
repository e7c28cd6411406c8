"""The first build of an engine, as it runs inside the isolated child process.

Copy the model's verified files into a private directory, checking every
byte's hash (`engines.sources`); build the backend's artifacts from that copy
into the staging entry, load them, run the first inference and compare with
the ORT CPU reference on the same copy. Only a build that survives all of this
(in a process that may crash) is committed to the cache by the parent, with
the digests it was built from.

Inputs for the check come from `parity.candidate_inputs`: the engine runs on
each candidate until one works; then (the engine closed, so only one session
holds memory at a time) the reference judges every try in order. A candidate
the reference itself rejects (a synthesized length shorter than an STFT's
padding) is a fact about the inputs; one it accepts but the engine failed on
is the engine's failure. If the reference rejects them all, the engine is
accepted unchecked, with the reason in its report.
"""

from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import batch_scaling
from .backend import BuildContext, CompiledEngine
from .errors import EngineError, ParityError
from .parity import Inputs, ParityReport, Reference, candidate_inputs, compare
from .registry import backend_class
from .sources import built_from, private_copy


def build_and_check(payload: dict[str, Any]) -> dict[str, Any]:
    ctx = BuildContext.from_dict(payload["context"])
    cls = backend_class(payload["backend"])
    entry_dir = pathlib.Path(payload["entry_dir"])
    with private_copy(ctx, entry_dir) as ctx:
        t0 = time.perf_counter()
        cls.build(ctx, entry_dir)
        t1 = time.perf_counter()
        engine = cls.from_entry(ctx, entry_dir)
        engine.load()
        scaling = None
        try:
            t2 = time.perf_counter()
            tried = _engine_phase(engine, ctx, payload.get("samples"))
            if tried and tried[-1].outputs is not None:  # here, not in the server: see batch_scaling
                scaling = batch_scaling.measure(engine, ctx.inputs, ctx.profile, tried[-1].inputs.feeds)
        finally:
            engine.close()  # one session at a time: the reference loads only now
        report = _reference_phase(tried, cls.backend, ctx)
    return {"backend": cls.backend, "build_s": t1 - t0, "load_s": t2 - t1,
            "first_infer_s": tried[-1].infer_s if tried and tried[-1].outputs is not None else None,
            "parity": report.to_dict(), "built_from": built_from(ctx),
            "batch_scaling": {str(b): s for b, s in scaling.items()} if scaling else None}


@dataclass
class _Tried:
    inputs: Inputs
    outputs: dict[str, np.ndarray] | None = None
    error: EngineError | None = None
    infer_s: float = 0.0


def _engine_phase(engine: CompiledEngine, ctx: BuildContext, samples: str | None) -> list[_Tried]:
    """Run the engine on candidate inputs until one works; every candidate tried, in order."""
    tried = []
    for cand in candidate_inputs(ctx.inputs, ctx.profile, samples):
        t0 = time.perf_counter()
        try:
            tried.append(_Tried(cand, engine.infer(cand.feeds), infer_s=time.perf_counter() - t0))
            break
        except EngineError as e:
            tried.append(_Tried(cand, error=e))
    return tried


def _reference_phase(tried: list[_Tried], backend: str, ctx: BuildContext) -> ParityReport:
    """Judge each try by the reference: inputs it rejects are the inputs' fault, the rest the engine's."""
    reference = Reference(ctx.model_path, ctx.outputs, ctx.options)
    rejected: list[str] = []
    for t in tried:
        try:
            expected = reference.run(t.inputs.feeds)
        except Exception as e:  # ORT's runtime errors on these inputs (Fail, InvalidArgument...)
            why = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
            if t.inputs.source == "samples":
                raise ParityError(f"{backend}: the model rejects the bundle's own sample inputs: {why}") from e
            rejected.append(f"{_sizes(t.inputs.dims)}: {why}" if t.inputs.dims else why)
            continue
        if t.outputs is None:  # the reference took inputs the engine failed on: the engine failed
            assert t.error is not None
            raise t.error
        return compare(t.outputs, expected, ctx.precision, backend, t.inputs.source, t.inputs.dims)
    reason = "; ".join(rejected[:1]) + (f"; {len(rejected) - 1} larger size(s) also rejected"
                                        if len(rejected) > 1 else "")
    return ParityReport.unchecked(ctx.precision, reason or "no input could be synthesized")


def _sizes(dims: dict[str, int]) -> str:
    return ", ".join(f"{n}={v}" for n, v in sorted(dims.items()))
