"""The first build of an engine, as it runs inside the isolated child process.

Build the backend's artifacts into the staging entry, load them, run the
first inference on the parity inputs and compare with the ORT CPU reference.
Only a build that survives all of this (in a process that may crash) is
committed to the cache by the parent.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

from .backend import BuildContext
from .parity import compare, reference_outputs, sample_inputs
from .registry import backend_class


def build_and_check(payload: dict[str, Any]) -> dict[str, Any]:
    ctx = BuildContext.from_dict(payload["context"])
    cls = backend_class(payload["backend"])
    entry_dir = pathlib.Path(payload["entry_dir"])
    t0 = time.perf_counter()
    cls.build(ctx, entry_dir)
    t1 = time.perf_counter()
    engine = cls.from_entry(ctx, entry_dir)
    engine.load()
    try:
        t2 = time.perf_counter()
        feeds, source = sample_inputs(ctx.inputs, ctx.profile, payload.get("samples"))
        outputs = engine.infer(feeds)
        t3 = time.perf_counter()
    finally:
        engine.close()
    expected = reference_outputs(ctx.model_path, feeds, ctx.options)
    report = compare(outputs, expected, ctx.precision, cls.backend, source)
    return {"backend": cls.backend, "build_s": t1 - t0, "load_s": t2 - t1, "first_infer_s": t3 - t2,
            "parity": report.to_dict()}
