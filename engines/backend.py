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

from bundle import TensorSpec, tensor_spec

from .base import Engine, EngineOptions
from .probe import GpuInfo, HardwareInfo, parse_cc
from .shapes import DimRange, ShapeProfile


@dataclass(frozen=True)
class SkipReason:
    """Why a backend was skipped before any build: `kind` is a short stable tag for the fleet
    (the same tags as `Fallback.kind` and `EngineError.kind`)."""

    kind: str  # "not-installed" | "no-gpu" | "unsupported"
    reason: str


@dataclass(frozen=True)
class BuildContext:
    """Everything a build needs, serialisable so a child process can rebuild it.

    `sources` are the verified files the model is made of (the model first, then
    its external-data files): paths relative to `source_root` with the sha256 the
    bundle's verification vouched for. A build never reads them in place: the
    child copies them into a private directory, hashing as it copies, refuses on
    any mismatch, and builds from the copy (`engines.sources`), so a file
    swapped after verification is never built, checked against, nor cached.
    """

    model_path: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    options: EngineOptions
    precision: str
    profile: ShapeProfile
    hardware: HardwareInfo
    min_compute_capability: str | None = None
    source_root: str = ""
    sources: tuple[tuple[str, str], ...] = ()

    @property
    def model_sha256(self) -> str:
        return self.sources[0][1] if self.sources else ""

    @property
    def model_file(self) -> str:
        """The model's path relative to `source_root`."""
        return self.sources[0][0] if self.sources else pathlib.Path(self.model_path).name

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
            "source_root": self.source_root,
            "sources": [list(s) for s in self.sources],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildContext:
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
            inputs=tuple(tensor_spec(t) for t in d["inputs"]),
            outputs=tuple(tensor_spec(t) for t in d["outputs"]),
            options=EngineOptions(**opts),
            precision=d["precision"],
            profile=ShapeProfile(dims),
            hardware=HardwareInfo(**hw),
            min_compute_capability=d["min_compute_capability"],
            source_root=d.get("source_root", ""),
            sources=tuple((str(rel), str(digest)) for rel, digest in d.get("sources", ())),
        )


class CompiledEngine(Engine):
    """An engine with the registry's hooks (see the module docstring)."""

    #: which manifest `serving.engines` entry this backend serves: "tensorrt" | "cuda" | "cpu"
    #: (named apart from the failure tags called `kind` elsewhere in this package)
    engine_kind: str = ""

    @classmethod
    @abc.abstractmethod
    def unavailable(cls, ctx: BuildContext) -> SkipReason | None: ...

    @classmethod
    @abc.abstractmethod
    def runtime_versions(cls, hw: HardwareInfo) -> dict[str, str | None]: ...

    @classmethod
    @abc.abstractmethod
    def build(cls, ctx: BuildContext, entry_dir: pathlib.Path) -> None: ...

    @classmethod
    @abc.abstractmethod
    def from_entry(cls, ctx: BuildContext, entry_dir: pathlib.Path) -> CompiledEngine: ...


def gpu_unavailable(ctx: BuildContext, provider: str | None = None) -> SkipReason | None:
    """The checks every GPU backend shares: a GPU, new enough, the runtime's provider."""
    hw = ctx.hardware
    if hw.gpu is None:
        why = "; ".join(hw.notes) or "no NVML and no Jetson board found"
        return SkipReason("no-gpu", f"no NVIDIA GPU detected ({why})")
    if ctx.min_compute_capability and hw.gpu.cc_tuple < parse_cc(ctx.min_compute_capability):
        return SkipReason("unsupported", f"GPU {hw.gpu.name} has compute capability {hw.gpu.compute_capability}, "
                                          f"below the bundle's minimum {ctx.min_compute_capability}")
    if provider is not None:
        if hw.onnxruntime_version is None:
            return SkipReason("not-installed", "onnxruntime is not installed")
        if provider not in hw.ort_providers:
            return SkipReason("not-installed", f"this onnxruntime build has no {provider} "
                                                f"(install onnxruntime-gpu: the `gpu` extra)")
        if "string" in ctx.dtypes:  # ORT would run the whole graph on its CPU EP
            return SkipReason("unsupported", "string tensors cannot live in GPU memory")
    if any(t.source is not None for t in ctx.outputs):  # ZipMap: sequences of maps live on the host
        return SkipReason("unsupported", "non-tensor outputs (a classifier's ZipMap) are computed on the CPU")
    return None
