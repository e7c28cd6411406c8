"""Can this device run a bundle at all? Asked before downloading it, and again after verifying it.

Before the download the question is asked of the constraints the signed
assignment carries (a copy of the manifest's); after verification, of the
manifest itself, which stays the authority. One function answers both, so
the two checks can never disagree. The runtime check is per engine kind: a
bundle names the engines it may be served with, and the device must be able
to run at least one of them (ONNX Runtime for ``cpu``; a GPU of the needed
compute capability plus the runtime's provider for ``cuda`` / ``tensorrt``).
"""

from __future__ import annotations

from collections.abc import Callable

from contract import BundleConstraints
from engines import HardwareInfo
from engines.probe import parse_cc

from .errors import UpdateRefused

#: engines a bundle may run on when its constraints do not name them (the manifest's default)
DEFAULT_ENGINES = ("tensorrt", "cuda", "cpu")


def _gpu(need_cc: str | None, hw: HardwareInfo) -> str | None:
    if hw.gpu is None:
        return "no NVIDIA GPU"
    try:
        too_old = bool(need_cc) and hw.gpu.cc_tuple < parse_cc(need_cc or "0")
    except ValueError:
        return f"unreadable compute capability {need_cc!r} (bundle) or {hw.gpu.compute_capability!r} (GPU)"
    if too_old:
        return f"GPU compute capability {hw.gpu.compute_capability} is below the bundle's minimum {need_cc}"
    return None


def _cpu(need_cc: str | None, hw: HardwareInfo) -> str | None:
    return None if hw.onnxruntime_version else "onnxruntime is not installed"


def _cuda(need_cc: str | None, hw: HardwareInfo) -> str | None:
    if "CUDAExecutionProvider" not in hw.ort_providers:
        return "this onnxruntime build has no CUDAExecutionProvider"
    return _gpu(need_cc, hw)


def _tensorrt(need_cc: str | None, hw: HardwareInfo) -> str | None:
    if hw.tensorrt_version is None and "TensorrtExecutionProvider" not in hw.ort_providers:
        return "neither TensorRT nor ONNX Runtime's TensorRT provider is installed"
    return _gpu(need_cc, hw)


#: engine kind -> why this device cannot run it (None: it can)
RUNTIMES: dict[str, Callable[[str | None, HardwareInfo], str | None]] = {
    "cpu": _cpu, "cuda": _cuda, "tensorrt": _tensorrt,
}


def check_constraints(ref: str, constraints: BundleConstraints, hw: HardwareInfo) -> None:
    """Raise `UpdateRefused` at step "preflight" if this device cannot run the bundle `ref`."""
    archs = constraints.architectures
    if hw.arch and archs and hw.arch not in archs:
        raise UpdateRefused("preflight", f"bundle {ref} is built for {', '.join(archs)}; this device is {hw.arch}")
    why: list[str] = []
    for kind in constraints.engines or DEFAULT_ENGINES:
        check = RUNTIMES.get(kind)
        reason = f"unknown engine kind {kind!r}" if check is None else check(constraints.min_compute_capability, hw)
        if reason is None:
            return
        why.append(f"{kind}: {reason}")
    raise UpdateRefused("preflight", f"bundle {ref} can run on none of its engines here ({'; '.join(why)})")
