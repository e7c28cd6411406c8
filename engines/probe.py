"""What this machine can run: GPUs, their compute capability and memory, runtime versions.

The probe is the seam between backend selection and the hardware: selection
reads a `HardwareInfo` and nothing else, so every GPU code path can be
exercised on a CPU machine by handing in a `StaticProbe` (no monkeypatching).

`SystemProbe` asks NVML first (desktop and data-centre GPUs). Jetson boards
have no NVML, so it falls back to the files L4T ships: `/proc/device-tree/model`
(the board), `/etc/nv_tegra_release` (the L4T release) and the CUDA toolkit's
`version.json`; the compute capability then comes from the board's SoC. Every
runtime is imported lazily and only inside `detect()`, and a runtime that is
missing or broken is reported as absent rather than raised.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GpuInfo:
    name: str
    #: "major.minor", e.g. "8.6"
    compute_capability: str
    memory_total_bytes: int = 0
    memory_free_bytes: int = 0
    #: True on Jetson-style SoCs whose GPU shares system memory
    integrated: bool = False

    @property
    def cc_tuple(self) -> tuple[int, int]:
        return parse_cc(self.compute_capability)


@dataclass(frozen=True)
class HardwareInfo:
    arch: str
    cpu_name: str
    cpu_count: int
    memory_total_bytes: int = 0
    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None
    tensorrt_version: str | None = None
    onnxruntime_version: str | None = None
    #: execution providers the installed ONNX Runtime build offers
    ort_providers: tuple[str, ...] = ()
    #: Python modules the GPU backends need, found without importing them
    polygraphy_available: bool = False
    jetson_model: str | None = None
    l4t_release: str | None = None
    #: how the GPU facts were obtained ("nvml", "jetson", "none") and what failed
    source: str = "none"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def gpu(self) -> GpuInfo | None:
        """The device engines are built for (device 0, as the runtimes default to)."""
        return self.gpus[0] if self.gpus else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Probe(Protocol):
    def detect(self) -> HardwareInfo: ...


@dataclass(frozen=True)
class StaticProbe:
    """A probe that answers what it was given: tests, and `--assume`-style tooling."""

    info: HardwareInfo

    def detect(self) -> HardwareInfo:
        return self.info


def parse_cc(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


#: Jetson SoC -> compute capability, keyed by a substring of the device-tree model.
_JETSON_CC: tuple[tuple[str, str], ...] = (
    ("thor", "11.0"), ("orin", "8.7"), ("xavier", "7.2"), ("tx2", "6.2"), ("tx1", "5.3"), ("nano", "5.3"),
)


def _dist_version(*names: str) -> str | None:
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class SystemProbe:
    """Probe the real machine. `root` relocates the Jetson files (tests point it at a fake tree)."""

    def __init__(self, root: str | os.PathLike[str] = "/", *, use_nvml: bool = True,
                 import_runtimes: bool = True, cuda_homes: Sequence[str] = ("usr/local/cuda",)) -> None:
        self.root = os.fspath(root)
        self.use_nvml = use_nvml
        self.import_runtimes = import_runtimes
        self.cuda_homes = tuple(cuda_homes)
        self._cached: HardwareInfo | None = None

    def detect(self) -> HardwareInfo:
        if self._cached is None:
            self._cached = self._detect()
        return self._cached

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel.lstrip("/"))

    def _read(self, rel: str, limit: int = 4096) -> str | None:
        try:
            with open(self._path(rel), "rb") as f:
                return f.read(limit).decode("utf-8", "replace").replace("\x00", "").strip()
        except OSError:
            return None

    def _detect(self) -> HardwareInfo:
        notes: list[str] = []
        gpus: tuple[GpuInfo, ...] = ()
        driver = cuda = None
        source = "none"
        if self.use_nvml:
            nvml = self._nvml(notes)
            if nvml is not None:
                gpus, driver, cuda = nvml
                source = "nvml"
        jetson_model, l4t = self._jetson_model(), self._l4t_release()
        if not gpus and jetson_model is not None:
            gpus = (self._jetson_gpu(jetson_model),)
            source = "jetson"
        if cuda is None:
            cuda = self._cuda_toolkit_version()
        ort_version, providers = self._onnxruntime(notes)
        return HardwareInfo(
            arch=platform.machine(),
            cpu_name=self._cpu_name(),
            cpu_count=os.cpu_count() or 1,
            memory_total_bytes=self._memory_total(),
            gpus=gpus,
            driver_version=driver,
            cuda_version=cuda,
            tensorrt_version=self._tensorrt_version(notes),
            onnxruntime_version=ort_version,
            ort_providers=providers,
            polygraphy_available=_has_module("polygraphy"),
            jetson_model=jetson_model,
            l4t_release=l4t,
            source=source,
            notes=tuple(notes),
        )

    def _nvml(self, notes: list[str]) -> tuple[tuple[GpuInfo, ...], str, str | None] | None:
        try:
            import pynvml  # nvidia-ml-py; lazy: absent on CPU machines and on Jetson
        except ImportError:
            notes.append("NVML: nvidia-ml-py is not installed")
            return None
        try:
            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            notes.append(f"NVML: {e}")
            return None
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
            cuda = None
            with contextlib.suppress(Exception):
                v = int(pynvml.nvmlSystemGetCudaDriverVersion_v2())
                cuda = f"{v // 1000}.{(v % 1000) // 10}"
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                gpus.append(GpuInfo(_text(pynvml.nvmlDeviceGetName(h)), f"{major}.{minor}",
                                    int(mem.total), int(mem.free)))
            return tuple(gpus), driver, cuda
        except Exception as e:
            notes.append(f"NVML: {e}")
            return None
        finally:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()

    def _jetson_model(self) -> str | None:
        model = self._read("/proc/device-tree/model")
        if model and ("jetson" in model.lower() or "nvidia" in model.lower()):
            return model
        return None

    def _l4t_release(self) -> str | None:
        text = self._read("/etc/nv_tegra_release")
        if not text:
            return None
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
        return f"{m.group(1)}.{m.group(2)}" if m else text.splitlines()[0][:80]

    def _jetson_gpu(self, model: str) -> GpuInfo:
        low = model.lower()
        cc = next((cc for key, cc in _JETSON_CC if key in low), "0.0")
        mem = self._memory_total()
        return GpuInfo(name=model, compute_capability=cc, memory_total_bytes=mem, integrated=True)

    def _cuda_toolkit_version(self) -> str | None:
        for home in self.cuda_homes:
            raw = self._read(os.path.join(home, "version.json"), 1 << 16)
            if raw:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    return str(json.loads(raw)["cuda"]["version"])
            raw = self._read(os.path.join(home, "version.txt"))
            if raw:
                m = re.search(r"(\d+\.\d+(?:\.\d+)?)", raw)
                if m:
                    return m.group(1)
        return None

    def _tensorrt_version(self, notes: list[str]) -> str | None:
        if not _has_module("tensorrt"):
            return None
        version = _dist_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11")
        if version is not None or not self.import_runtimes:
            return version
        try:  # Jetson: TensorRT comes from apt (python3-libnvinfer), without dist metadata
            trt = importlib.import_module("tensorrt")
            return str(trt.__version__)
        except Exception as e:
            notes.append(f"TensorRT: import failed: {e}")
            return None

    def _onnxruntime(self, notes: list[str]) -> tuple[str | None, tuple[str, ...]]:
        if not _has_module("onnxruntime"):
            return None, ()
        version = _dist_version("onnxruntime", "onnxruntime-gpu")
        if _dist_version("onnxruntime") and _dist_version("onnxruntime-gpu"):
            notes.append("ONNX Runtime: both onnxruntime and onnxruntime-gpu are installed; they overwrite each "
                         "other's module: uninstall both, then install one (OUTPOST_GPU=1 bash scripts/setup.sh)")
        if not self.import_runtimes:
            return version, ()
        try:
            ort = importlib.import_module("onnxruntime")
            return str(ort.__version__), tuple(ort.get_available_providers())
        except Exception as e:
            notes.append(f"ONNX Runtime: import failed: {e}")
            return None, ()

    def _cpu_name(self) -> str:
        text = self._read("/proc/cpuinfo", 1 << 16) or ""
        for key in ("model name", "Hardware", "Processor"):
            m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
            if m:
                return m.group(1).strip()
        return platform.processor() or platform.machine()

    def _memory_total(self) -> int:
        try:
            import psutil

            return int(psutil.virtual_memory().total)
        except Exception:
            return 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cuda_gpu_present(probe: Probe | None = None) -> bool:
    """Whether a CUDA GPU is usable here (decides whether `gpu`-marked tests run)."""
    return (probe or SystemProbe()).detect().gpu is not None
