"""ONNX Runtime with the CUDA execution provider: any GPU, any model ORT runs.

The cache entry is ORT's optimized model for this GPU (fusions chosen for the
CUDA EP), so a restart skips graph optimization; the key names the GPU, the
driver and CUDA. The bundle's `fp16` precision only allows TF32 here: the
CUDA EP runs the dtypes the model has.
"""

from __future__ import annotations

import pathlib

from .backend import BuildContext, SkipReason, gpu_unavailable
from .ort_common import OrtGpuEngine, ProviderList, cuda_provider_options
from .probe import HardwareInfo

PROVIDER = "CUDAExecutionProvider"


class OrtCudaEngine(OrtGpuEngine):
    backend = "ort-cuda"
    engine_kind = "cuda"
    primary_provider = PROVIDER

    @classmethod
    def unavailable(cls, ctx: BuildContext) -> SkipReason | None:
        return gpu_unavailable(ctx, PROVIDER)

    @classmethod
    def runtime_versions(cls, hw: HardwareInfo) -> dict[str, str | None]:
        return {"onnxruntime": hw.onnxruntime_version, "cuda": hw.cuda_version, "driver": hw.driver_version}

    @classmethod
    def provider_list(cls, ctx: BuildContext, entry_dir: pathlib.Path) -> ProviderList:
        return [(PROVIDER, cuda_provider_options(ctx))]
