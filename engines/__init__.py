"""ONNX -> ready-to-run engine: backends, selection with fallback, engine cache.

Public API (everything else is internal):

    open_engine(bundle, model=None, backend="auto", options=None, cache_dir=None, probe=None)
        -> EngineResult(engine, backend, fallbacks, cache_hit, build, load_s, parity)
    plan(...)            the same arguments: what open_engine would try here and why (no build)
    SystemProbe / StaticProbe / HardwareInfo / GpuInfo   the hardware seam
    EngineCache          the on-disk cache (size bound, LRU) if a caller wants to own it
    BACKENDS             backend name -> "module:Class"

Backends, best first: `tensorrt` (native TensorRT through Polygraphy),
`ort-tensorrt`, `ort-cuda`, `ort-cpu`. `tensorrt` and `onnxruntime` are
imported lazily, so this package imports on a machine with neither.
"""

from __future__ import annotations

from .base import Engine, EngineOptions
from .cache import CacheKey, EngineCache
from .errors import (
    BackendUnavailable,
    BuildCrashed,
    BuildTimeout,
    CacheError,
    EngineBuildError,
    EngineError,
    EngineLoadError,
    InferenceError,
    ModelChanged,
    OutOfMemory,
    ParityError,
)
from .pipeline import BuildPlan, EngineResult, PlannedBackend, default_cache_dir, open_engine, plan
from .probe import GpuInfo, HardwareInfo, Probe, StaticProbe, SystemProbe
from .registry import AUTO, BACKENDS, Fallback

__all__ = [
    "AUTO", "BACKENDS", "BackendUnavailable", "BuildCrashed", "BuildPlan", "BuildTimeout", "CacheError", "CacheKey",
    "Engine", "EngineBuildError", "EngineCache", "EngineError", "EngineLoadError", "EngineOptions", "EngineResult",
    "Fallback", "GpuInfo", "HardwareInfo", "InferenceError", "ModelChanged", "OutOfMemory", "ParityError",
    "PlannedBackend", "Probe", "StaticProbe", "SystemProbe", "default_cache_dir", "open_engine", "plan",
]
