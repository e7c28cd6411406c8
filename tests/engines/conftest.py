"""Fixtures of the engines tests: hardware probes handed in (the seam), a private engine cache per test.

Tests marked `gpu` run only where a CUDA GPU is detected (the hook is in the
root conftest; bench/gpu_check.sh runs them on such a machine).
"""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from engines import GpuInfo, HardwareInfo, StaticProbe, SystemProbe


@pytest.fixture(scope="session")
def real_hardware() -> HardwareInfo:
    return SystemProbe().detect()


@pytest.fixture(scope="session")
def cpu_probe(real_hardware: HardwareInfo) -> StaticProbe:
    """This machine as if it had no GPU and no GPU runtimes: the CPU-only device."""
    return StaticProbe(dataclasses.replace(
        real_hardware, gpus=(), tensorrt_version=None, polygraphy_available=False, driver_version=None,
        cuda_version=None, ort_providers=("CPUExecutionProvider",), notes=("NVML: not present (test probe)",)))


@pytest.fixture(scope="session")
def gpu_probe(real_hardware: HardwareInfo) -> StaticProbe:
    """A machine claiming an Ampere GPU with TensorRT 10 and onnxruntime-gpu: drives the GPU code
    paths on a CPU machine, where the runtimes themselves then fail for real."""
    return StaticProbe(dataclasses.replace(
        real_hardware,
        gpus=(GpuInfo("NVIDIA A10G", "8.6", 24 << 30, 23 << 30),),
        driver_version="550.54.15", cuda_version="12.4", tensorrt_version="10.3.0", polygraphy_available=True,
        ort_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
        source="nvml", notes=()))


@pytest.fixture
def cache_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "engine-cache"
