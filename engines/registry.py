"""The backend name table and the `auto` walk: which backends to try, in what order, and why not the others.

`auto` walks the bundle's `serving.engines` preference order (manifest kinds
"tensorrt", "cuda", "cpu"), expands each kind to its backends (native
TensorRT before ORT's TensorRT EP), and keeps those the hardware probe says
can run here; every backend left out is a `Fallback` with its reason. A named
backend is tried alone: asking for `tensorrt` on a CPU machine is an error
that says why, not a silent CPU engine.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .backend import BuildContext, CompiledEngine
from .errors import BackendUnavailable

#: backend name -> "module:Class" (imported on use; no runtime is imported by this)
BACKENDS: dict[str, str] = {
    "tensorrt": "engines.tensorrt:TensorrtEngine",
    "ort-tensorrt": "engines.ort_tensorrt:OrtTensorrtEngine",
    "ort-cuda": "engines.ort_cuda:OrtCudaEngine",
    "ort-cpu": "engines.ort_cpu:OrtCpuEngine",
}
#: manifest `serving.engines` entry -> backends, best first (each backend's `engine_kind`)
ENGINE_KINDS: dict[str, tuple[str, ...]] = {
    "tensorrt": ("tensorrt", "ort-tensorrt"),
    "cuda": ("ort-cuda",),
    "cpu": ("ort-cpu",),
}
AUTO = "auto"


@dataclass(frozen=True)
class Fallback:
    """A backend that was skipped or failed, and why (shown by `engine inspect`, reported to the fleet).

    kind: "not-installed" | "no-gpu" | "unsupported" | "not-preferred" | "build-failed" |
          "parity" | "out-of-memory" | "crashed" | "timeout" | "load-failed"
    """

    backend: str
    reason: str
    kind: str = ""


def backend_class(name: str) -> type[CompiledEngine]:
    target = BACKENDS.get(name)
    if target is None:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of: {', '.join([AUTO, *BACKENDS])}")
    module, attr = target.split(":")
    cls = getattr(importlib.import_module(module), attr)
    assert isinstance(cls, type) and issubclass(cls, CompiledEngine)
    return cls


def candidates(requested: str, preference: tuple[str, ...], ctx: BuildContext) -> tuple[list[str], list[Fallback]]:
    """(backends to try in order, backends left out with their reasons)."""
    if requested != AUTO:
        cls = backend_class(requested)
        why = cls.unavailable(ctx)
        if why is not None:
            raise BackendUnavailable(f"backend {requested} cannot run here: {why.reason}")
        return [requested], []
    order: list[str] = []
    for engine_kind in preference:
        order.extend(b for b in ENGINE_KINDS.get(engine_kind, ()) if b not in order)
    chosen: list[str] = []
    skipped: list[Fallback] = []
    for name in order:
        why = backend_class(name).unavailable(ctx)
        if why is None:
            chosen.append(name)
        else:
            skipped.append(Fallback(name, why.reason, why.kind))
    skipped += [Fallback(b, f"not in the bundle's serving.engines preference ({', '.join(preference)})",
                         "not-preferred") for b in BACKENDS if b not in order]
    return chosen, skipped
