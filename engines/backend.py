"""What a backend adds to the engine interface: availability, a build step, loading from the cache.

A backend is an `Engine` subclass with four class-level hooks, so the
registry and the build pipeline never branch on backend names:

- `unavailable(ctx)`: why this backend cannot serve this model here, or None.
  Pure: it reads the `HardwareInfo` in the context and imports nothing.
- `runtime_versions(hw)`: what goes into the cache key besides the model.
- `build(ctx, entry_dir)`: write the engine's artifacts into a fresh cache
  entry directory (run in a child process the first time).
- `from_entry(ctx, entry_dir)`: an unloaded engine over those artifacts.
"""

from __future__ import annotations

import abc
import pathlib
from dataclasses import asdict, dataclass
from typing import Any

from bundle import TensorSpec

from .base import Engine, EngineOptions
from .probe import GpuInfo, HardwareInfo, parse_cc
from .shapes import DimRange, ShapeProfile


@dataclass(frozen=True)
class Unavailable:
    """Why a backend was skipped before any build: `kind` is a short stable tag for the fleet."""

    kind: str  # "not-installed" | "no-gpu" | "unsupported"
    reason: str


@dataclass(frozen=True)
class BuildContext:
    """Everything a build needs, serialisable so a child process can rebuild it."""

    model_path: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    options: EngineOptions
    precision: str
    profile: ShapeProfile
    hardware: HardwareInfo
    min_compute_capability: str | None = None

    @property
    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.inputs + self.outputs}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "options": asdict(self.options),
            "precision": self.precision,
            "profile": self.profile.to_key(),
            "batch_dims": [n for n, r in self.profile.dims if r.batch],
            "hardware": self.hardware.to_dict(),
            "min_compute_capability": self.min_compute_capability,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildContext:
        def spec(t: dict[str, Any]) -> TensorSpec:
            return TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))

        hw = dict(d["hardware"])
        hw["gpus"] = tuple(GpuInfo(**g) for g in hw["gpus"])
        for k in ("ort_providers", "notes"):
            hw[k] = tuple(hw[k])
        opts = dict(d["options"])
        opts["dim_ranges"] = tuple(tuple(r) for r in opts["dim_ranges"])
        batch = set(d["batch_dims"])
        dims = tuple((n, DimRange(lo, opt, hi, batch=n in batch)) for n, lo, opt, hi in d["profile"])
        return cls(
            model_path=d["model_path"],
            inputs=tuple(spec(t) for t in d["inputs"]),
            outputs=tuple(spec(t) for t in d["outputs"]),
            options=EngineOptions(**opts),
            precision=d["precision"],
            profile=ShapeProfile(dims),
            hardware=HardwareInfo(**hw),
            min_compute_capability=d["min_compute_capability"],
        )


class CompiledEngine(Engine):
    """An engine with the registry's hooks (see the module docstring)."""

    #: which manifest `serving.engines` kind this backend serves: "tensorrt" | "cuda" | "cpu"
    kind: str = ""
    #: whether the cache key includes the GPU (model and compute capability)
    uses_gpu: bool = False

    @classmethod
    @abc.abstractmethod
    def unavailable(cls, ctx: BuildContext) -> Unavailable | None: ...

    @classmethod
    @abc.abstractmethod
    def runtime_versions(cls, hw: HardwareInfo) -> dict[str, str | None]: ...

    @classmethod
    @abc.abstractmethod
    def build(cls, ctx: BuildContext, entry_dir: pathlib.Path) -> None: ...

    @classmethod
    @abc.abstractmethod
    def from_entry(cls, ctx: BuildContext, entry_dir: pathlib.Path) -> CompiledEngine: ...


def gpu_unavailable(ctx: BuildContext, provider: str | None = None) -> Unavailable | None:
    """The checks every GPU backend shares: a GPU, new enough, the runtime's provider."""
    hw = ctx.hardware
    if hw.gpu is None:
        why = "; ".join(hw.notes) or "no NVML and no Jetson board found"
        return Unavailable("no-gpu", f"no NVIDIA GPU detected ({why})")
    if ctx.min_compute_capability and hw.gpu.cc_tuple < parse_cc(ctx.min_compute_capability):
        return Unavailable("unsupported", f"GPU {hw.gpu.name} has compute capability {hw.gpu.compute_capability}, "
                                          f"below the bundle's minimum {ctx.min_compute_capability}")
    if provider is not None:
        if hw.onnxruntime_version is None:
            return Unavailable("not-installed", "onnxruntime is not installed")
        if provider not in hw.ort_providers:
            return Unavailable("not-installed", f"this onnxruntime build has no {provider} "
                                                f"(install onnxruntime-gpu: the `gpu` extra)")
        if "string" in ctx.dtypes:  # ORT would run the whole graph on its CPU EP
            return Unavailable("unsupported", "string tensors cannot live in GPU memory")
    return None
