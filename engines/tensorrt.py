"""Native TensorRT: the fastest engine on an NVIDIA GPU, built with Polygraphy's loaders.

Build: TensorRT's ONNX parser (its errors become the fallback reason, node
by node), one optimization profile from the manifest's dynamic dims and batch
limit, fp16 when the bundle asks for it and the GPU has fast fp16, TF32 off
(so fp32 bundles pass a tight parity check), a workspace cap when configured,
and a timing cache saved beside the plan so a rebuild (new driver, evicted
entry) skips most tactic timing. Runtime: Polygraphy's `TrtRunner`, which
owns the device buffers (through its CUDA wrapper over libcudart) and the
execution context; one context is not re-entrant, so calls are serialised.

TensorRT and Polygraphy are imported only inside build and load.
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bundle import TensorSpec

from .backend import BuildContext, CompiledEngine, SkipReason, gpu_unavailable
from .base import EngineOptions
from .errors import EngineBuildError, EngineLoadError, InferenceError
from .probe import HardwareInfo

PLAN = "engine.plan"
TIMING_CACHE = "timing.cache"
FP16_MIN_CC = (5, 3)


def _import_trt() -> tuple[Any, Any]:
    try:
        import polygraphy.backend.trt as poly_trt
        import tensorrt as trt
    except ImportError as e:
        raise EngineBuildError(f"tensorrt: not installed: {e}") from e
    return trt, poly_trt


def parse_onnx(trt: Any, model_path: str) -> tuple[Any, Any, Any]:
    """Builder, network and parser for `model_path`; the parser's own errors on failure."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # TensorRT 8.x (JetPack 5) still needs explicit batch
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(model_path):
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
        raise EngineBuildError("tensorrt: ONNX parser rejected the model: " + "; ".join(errors)[:1500])
    return builder, network, parser


class TensorrtEngine(CompiledEngine):
    backend = "tensorrt"
    engine_kind = "tensorrt"
    uses_gpu = True

    def __init__(self, plan_path: str | pathlib.Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 options: EngineOptions | None = None) -> None:
        super().__init__(inputs, outputs)
        self.plan_path = pathlib.Path(plan_path)
        self.options = options or EngineOptions()
        self._runner: Any = None
        self._lock = threading.Lock()

    @classmethod
    def unavailable(cls, ctx: BuildContext) -> SkipReason | None:
        reason = gpu_unavailable(ctx)
        if reason is not None:
            return reason
        if ctx.hardware.tensorrt_version is None:
            return SkipReason("not-installed", "TensorRT is not installed (the `gpu` extra)")
        if not ctx.hardware.polygraphy_available:
            return SkipReason("not-installed", "polygraphy is not installed (the `gpu` extra)")
        return None

    @classmethod
    def runtime_versions(cls, hw: HardwareInfo) -> dict[str, str | None]:
        return {"tensorrt": hw.tensorrt_version, "cuda": hw.cuda_version, "driver": hw.driver_version}

    @classmethod
    def build(cls, ctx: BuildContext, entry_dir: pathlib.Path) -> None:
        trt, poly = _import_trt()
        gpu = ctx.hardware.gpu
        fp16 = ctx.precision == "fp16" and gpu is not None and gpu.cc_tuple >= FP16_MIN_CC
        dynamic = [s for s in ctx.inputs if s.dynamic_dims]
        profiles = None
        if dynamic:
            profile = poly.Profile()
            for spec in dynamic:
                profile.add(spec.name, *(ctx.profile.shape(spec, w) for w in ("min", "opt", "max")))
            profiles = [profile]
        pools = None
        if ctx.options.gpu_mem_limit_bytes:
            pools = {trt.MemoryPoolType.WORKSPACE: ctx.options.gpu_mem_limit_bytes}
        timing = entry_dir / TIMING_CACHE
        config = poly.CreateConfig(fp16=fp16, tf32=False, profiles=profiles, memory_pool_limits=pools,
                                   load_timing_cache=str(timing) if timing.exists() else None)
        network = parse_onnx(trt, ctx.model_path)
        try:
            plan = poly.EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing))()
            if not plan:
                raise EngineBuildError("tensorrt: the builder returned no engine (see the TensorRT log)")
            with open(entry_dir / PLAN, "wb") as f:
                f.write(bytes(plan))
        except EngineBuildError:
            raise
        except Exception as e:  # Polygraphy raises PolygraphyException; TensorRT raises RuntimeError
            raise EngineBuildError(f"tensorrt: build failed: {e}") from e

    @classmethod
    def from_entry(cls, ctx: BuildContext, entry_dir: pathlib.Path) -> TensorrtEngine:
        return cls(entry_dir / PLAN, ctx.inputs, ctx.outputs, ctx.options)

    def load_impl(self) -> None:
        try:
            _, poly = _import_trt()
            loader = poly.EngineFromBytes(self.plan_path.read_bytes())
            runner = poly.TrtRunner(loader, name=f"outpost:{self.plan_path.parent.name}")
            runner.activate()
        except Exception as e:
            raise EngineLoadError(f"tensorrt: cannot load {self.plan_path}: {e}") from e
        self._runner = runner

    def infer_impl(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            with self._lock:
                result = self._runner.infer(dict(feeds))
                # Polygraphy reuses its host buffers between calls: copy before releasing the lock.
                return {name: np.array(result[name], copy=True) for name in outputs}
        except Exception as e:
            raise InferenceError(f"tensorrt: {e}") from e

    def close_impl(self) -> None:
        with self._lock:
            runner, self._runner = self._runner, None
            if runner is not None:
                runner.deactivate()
