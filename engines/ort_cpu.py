"""ONNX Runtime on the CPU: the backend that always works, the last fallback.

Its cache entry is ORT's optimized model, saved at build time: a later load
reads it with graph optimization off. The optimizer's output can contain
layouts chosen for this CPU's instruction set (NCHWc blocking for AVX-512 or
AVX2), which is why the cache key of this backend names the CPU.
"""

from __future__ import annotations

from .backend import BuildContext, SkipReason
from .ort_common import OrtEngine, ort_unavailable, session_options
from .probe import HardwareInfo


class OrtCpuEngine(OrtEngine):
    backend = "ort-cpu"
    engine_kind = "cpu"
    primary_provider = "CPUExecutionProvider"

    @classmethod
    def unavailable(cls, ctx: BuildContext) -> SkipReason | None:
        return ort_unavailable(ctx.hardware)

    @classmethod
    def runtime_versions(cls, hw: HardwareInfo) -> dict[str, str | None]:
        return {"onnxruntime": hw.onnxruntime_version, "cpu": hw.cpu_name, "arch": hw.arch}


__all__ = ["OrtCpuEngine", "session_options"]
