"""System metrics for reports: CPU, memory, disk, temperature, and GPU where one can be read.

`sample()` returns the keys of the report schema's telemetry window
(`contract.report.SYSTEM_METRICS`), leaving out what this device cannot
measure rather than inventing zeros. GPU figures come from the first source
that opens, in the order of `GPU_SOURCES`: NVML (nvidia-ml-py's `pynvml`,
imported lazily; absent on Jetson and CPU-only machines) and then the Jetson
sysfs load file (integrated GPU: utilisation only, its memory is the system's).
"""

from __future__ import annotations

import importlib
import logging
import os
import pathlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

import psutil

log = logging.getLogger(__name__)

#: Jetson GPU load files (tenths of a percent), by L4T generation.
JETSON_LOAD_FILES = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load",
                     "sys/devices/platform/bus@0/17000000.gpu/load", "sys/devices/platform/17000000.ga10b/load",
                     "sys/devices/platform/17000000.gv11b/load")


class GpuSource(Protocol):
    name: str

    def read(self) -> dict[str, float]: ...


class NvmlGpu:
    """GPU 0 through NVML; `open` returns None where the library or a driver is missing."""

    name = "nvml"

    def __init__(self, nvml: ModuleType, handle: Any) -> None:
        self._nvml = nvml
        self._handle = handle

    @classmethod
    def open(cls, import_module: Callable[[str], ModuleType] = importlib.import_module) -> NvmlGpu | None:
        try:
            nvml = import_module("pynvml")
        except ImportError:
            return None
        try:
            nvml.nvmlInit()
            if nvml.nvmlDeviceGetCount() < 1:
                return None
            return cls(nvml, nvml.nvmlDeviceGetHandleByIndex(0))
        except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            log.debug("NVML unavailable: %s", e)
            return None

    def read(self) -> dict[str, float]:
        nvml, h = self._nvml, self._handle
        out: dict[str, float] = {}
        try:
            out["gpu_util_percent"] = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            out["gpu_memory_bytes"] = float(nvml.nvmlDeviceGetMemoryInfo(h).used)
            out["gpu_temperature_c"] = float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
        except Exception as e:  # a GPU that fell off the bus must not stop reports
            log.debug("NVML read failed: %s", e)
        return out


class JetsonGpu:
    """The integrated GPU's load from sysfs (0..1000, tenths of a percent)."""

    name = "jetson"

    def __init__(self, load_file: pathlib.Path) -> None:
        self.load_file = load_file

    @classmethod
    def open(cls, root: str | os.PathLike[str] = "/") -> JetsonGpu | None:
        for rel in JETSON_LOAD_FILES:
            path = pathlib.Path(root) / rel
            if path.is_file():
                return cls(path)
        return None

    def read(self) -> dict[str, float]:
        try:
            raw = self.load_file.read_text().strip()
            return {"gpu_util_percent": min(100.0, max(0.0, int(raw) / 10.0))}
        except (OSError, ValueError):
            return {}


#: Tried in order by `open_gpu`; each entry returns a source or None.
GPU_SOURCES: tuple[Callable[[], GpuSource | None], ...] = (NvmlGpu.open, JetsonGpu.open)


def open_gpu(sources: tuple[Callable[[], GpuSource | None], ...] = GPU_SOURCES) -> GpuSource | None:
    for open_source in sources:
        source = open_source()
        if source is not None:
            return source
    return None


def _temperature_c(gpu_temperature: float | None) -> float | None:
    """The hottest sensor psutil can read (CPU package, SoC zones), else the GPU's, else None."""
    readings: list[float] = []
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        sensors = {}
    for entries in sensors.values():
        readings.extend(e.current for e in entries if e.current is not None and -100 < e.current < 300)
    if gpu_temperature is not None:
        readings.append(gpu_temperature)
    return max(readings) if readings else None


class Sampler:
    """Holds the GPU source open between samples (NVML init is not free)."""

    def __init__(self, disk_path: str | os.PathLike[str] = "/", gpu: GpuSource | None = None,
                 probe_gpu: bool = True) -> None:
        self.disk_path = os.fspath(disk_path)
        self.gpu = gpu if gpu is not None or not probe_gpu else open_gpu()
        psutil.cpu_percent(None)  # primes the counter: the first real sample covers the time since now

    def sample(self) -> dict[str, float]:
        mem = psutil.virtual_memory()
        out: dict[str, float] = {"cpu_percent": float(psutil.cpu_percent(None)),
                                 "memory_bytes": float(mem.total - mem.available),
                                 "memory_percent": float(mem.percent)}
        try:
            disk = psutil.disk_usage(self.disk_path)
            out["disk_free_bytes"], out["disk_percent"] = float(disk.free), float(disk.percent)
        except OSError:
            pass
        gpu = self.gpu.read() if self.gpu is not None else {}
        temperature = _temperature_c(gpu.pop("gpu_temperature_c", None))
        if temperature is not None:
            out["temperature_c"] = temperature
        out.update(gpu)
        return out


_default: Sampler | None = None


def sample(disk_path: str | os.PathLike[str] = "/") -> dict[str, float]:
    """One reading of the system metrics (a process-wide `Sampler` is kept for the CPU counter and NVML)."""
    global _default
    if _default is None or _default.disk_path != os.fspath(disk_path):
        _default = Sampler(disk_path)
    return _default.sample()
