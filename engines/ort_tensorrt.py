"""ONNX Runtime with the TensorRT execution provider (CUDA EP behind it for what TensorRT rejects).

TensorRT engines that ORT builds are written to ORT's own engine cache, which
we point inside our cache entry (`trt_engine_cache_path`), together with
TensorRT's timing cache, so both live and die with the entry and its key. The
model ORT loads is the bundle's original one: a model with TensorRT-compiled
nodes cannot be saved as an optimized ONNX file. Explicit optimization
profiles (`trt_profile_*_shapes`) make ORT build at session creation, inside
the isolated first build, instead of at the first request.
"""

from __future__ import annotations

import pathlib
from typing import Any

from .backend import BuildContext, SkipReason, gpu_unavailable
from .ort_common import OrtGpuEngine, ProviderList, cuda_provider_options
from .probe import HardwareInfo

PROVIDER = "TensorrtExecutionProvider"
TRT_DIR = "ort-trt"
#: fp16 kernels are worth it from compute capability 5.3 (Jetson TX1) up
FP16_MIN_CC = (5, 3)


def _shapes_option(shapes: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def trt_provider_options(ctx: BuildContext, cache_dir: pathlib.Path) -> dict[str, Any]:
    gpu = ctx.hardware.gpu
    fp16 = ctx.precision == "fp16" and gpu is not None and gpu.cc_tuple >= FP16_MIN_CC
    opts: dict[str, Any] = {
        "device_id": ctx.options.gpu_device_id,
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_builder_optimization_level": 3,
    }
    if ctx.options.gpu_mem_limit_bytes:
        opts["trt_max_workspace_size"] = ctx.options.gpu_mem_limit_bytes
    dynamic = [s for s in ctx.inputs if s.dynamic_dims]
    if dynamic:
        for which in ("min", "opt", "max"):
            opts[f"trt_profile_{which}_shapes"] = _shapes_option(ctx.profile.shapes(dynamic, which))
    return opts


class OrtTensorrtEngine(OrtGpuEngine):
    backend = "ort-tensorrt"
    engine_kind = "tensorrt"
    primary_provider = PROVIDER
    saves_optimized_model = False

    @classmethod
    def unavailable(cls, ctx: BuildContext) -> SkipReason | None:
        reason = gpu_unavailable(ctx, PROVIDER)
        if reason is None and ctx.hardware.tensorrt_version is None:
            return SkipReason("not-installed", "TensorRT libraries are not installed (the `gpu` extra)")
        return reason

    @classmethod
    def runtime_versions(cls, hw: HardwareInfo) -> dict[str, str | None]:
        return {"onnxruntime": hw.onnxruntime_version, "tensorrt": hw.tensorrt_version,
                "cuda": hw.cuda_version, "driver": hw.driver_version}

    @classmethod
    def provider_list(cls, ctx: BuildContext, entry_dir: pathlib.Path) -> ProviderList:
        trt_dir = entry_dir / TRT_DIR
        trt_dir.mkdir(parents=True, exist_ok=True)
        return [(PROVIDER, trt_provider_options(ctx, trt_dir)), ("CUDAExecutionProvider", cuda_provider_options(ctx))]
