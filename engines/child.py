"""The first build of an engine, as it runs inside the isolated child process.

Copy the model's verified files into a private directory, checking every
byte's hash (`engines.sources`); build the backend's artifacts from that copy
into the staging entry, load them, run the first inference and compare with
the ORT CPU reference on the same copy. Only a build that survives all of this
(in a process that may crash) is committed to the cache by the parent, with
the digests it was built from.

Inputs for the check come from `parity.candidate_inputs`: the reference runs
first on each candidate, and a candidate the reference itself rejects (a
synthesized length shorter than an STFT's padding) is a fact about the inputs,
so the next is tried; if the reference rejects them all, the engine is
accepted unchecked, with the reason in its report.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

from .backend import BuildContext, CompiledEngine
from .errors import ParityError
from .parity import ParityReport, Reference, candidate_inputs, compare
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
        try:
            t2 = time.perf_counter()
            report, infer_s = first_check(engine, cls, ctx, payload.get("samples"))
        finally:
            engine.close()
    return {"backend": cls.backend, "build_s": t1 - t0, "load_s": t2 - t1, "first_infer_s": infer_s,
            "parity": report.to_dict(), "built_from": built_from(ctx)}


def first_check(engine: CompiledEngine, cls: type[CompiledEngine], ctx: BuildContext,
                samples: str | None) -> tuple[ParityReport, float | None]:
    """(parity report, seconds of the engine's first inference or None when it did not run)."""
    reference = Reference(ctx.model_path, ctx.outputs, ctx.options)
    rejected: list[str] = []
    for cand in candidate_inputs(ctx.inputs, ctx.profile, samples):
        try:
            expected = reference.run(cand.feeds)
        except Exception as e:  # ORT's runtime errors on these inputs (Fail, InvalidArgument...)
            why = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
            if cand.source == "samples":
                raise ParityError(f"{cls.backend}: the model rejects the bundle's own sample inputs: {why}") from e
            rejected.append(f"{_sizes(cand.dims)}: {why}" if cand.dims else why)
            continue
        t0 = time.perf_counter()
        outputs = engine.infer(cand.feeds)  # the reference took these inputs: a failure here is the engine's
        infer_s = time.perf_counter() - t0
        return compare(outputs, expected, ctx.precision, cls.backend, cand.source, cand.dims), infer_s
    reason = "; ".join(rejected[:1]) + (f"; {len(rejected) - 1} larger size(s) also rejected"
                                        if len(rejected) > 1 else "")
    return ParityReport.unchecked(ctx.precision, reason or "no input could be synthesized"), None


def _sizes(dims: dict[str, int]) -> str:
    return ", ".join(f"{n}={v}" for n, v in sorted(dims.items()))
