"""The hardware probe: this machine for real, and a Jetson board from a fake filesystem tree."""

from __future__ import annotations

import json
import pathlib

import onnxruntime

from bundle import TensorSpec
from engines import GpuInfo, HardwareInfo, StaticProbe, SystemProbe
from engines.backend import BuildContext
from engines.base import EngineOptions
from engines.shapes import profile_for


def test_system_probe_reports_this_machine(real_hardware: HardwareInfo) -> None:
    assert real_hardware.cpu_count >= 1
    assert real_hardware.arch
    assert real_hardware.onnxruntime_version == onnxruntime.__version__
    assert "CPUExecutionProvider" in real_hardware.ort_providers
    if real_hardware.gpu is None:
        assert real_hardware.source == "none"


def _jetson_tree(root: pathlib.Path, model: str) -> None:
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    (root / "etc").mkdir()
    (root / "etc/nv_tegra_release").write_text(
        "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
        "DATE: Tue Aug  1 19:57:35 UTC 2023\n")
    (root / "usr/local/cuda").mkdir(parents=True)
    (root / "usr/local/cuda/version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": "11.4.19"}}))


def test_jetson_without_nvml_is_found_from_l4t_files(tmp_path: pathlib.Path) -> None:
    _jetson_tree(tmp_path, "NVIDIA Jetson AGX Orin Developer Kit")
    hw = SystemProbe(tmp_path, use_nvml=False).detect()
    assert hw.source == "jetson"
    assert hw.jetson_model == "NVIDIA Jetson AGX Orin Developer Kit"
    assert hw.l4t_release == "35.4.1"
    assert hw.cuda_version == "11.4.19"
    assert hw.gpu is not None and hw.gpu.compute_capability == "8.7" and hw.gpu.integrated
    assert hw.gpu.memory_total_bytes == hw.memory_total_bytes


def test_older_jetson_gets_its_soc_compute_capability(tmp_path: pathlib.Path) -> None:
    _jetson_tree(tmp_path, "NVIDIA Jetson Xavier NX Developer Kit")
    hw = SystemProbe(tmp_path, use_nvml=False).detect()
    assert hw.gpu is not None and hw.gpu.compute_capability == "7.2"


def test_other_boards_have_no_gpu(tmp_path: pathlib.Path) -> None:
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text("Raspberry Pi 4 Model B Rev 1.4")
    hw = SystemProbe(tmp_path, use_nvml=False).detect()
    assert hw.gpu is None and hw.jetson_model is None and hw.source == "none"


def test_static_probe_answers_what_it_was_given(gpu_probe: StaticProbe) -> None:
    hw = gpu_probe.detect()
    assert hw.gpu == GpuInfo("NVIDIA A10G", "8.6", 24 << 30, 23 << 30)
    assert hw.gpu.cc_tuple == (8, 6)


def test_build_context_survives_the_trip_to_the_child_process(gpu_probe: StaticProbe) -> None:
    inputs = (TensorSpec("image", "float32", ("batch", 3, "height", "width")),)
    outputs = (TensorSpec("embedding", "float32", ("batch", 8)),)
    options = EngineOptions(intra_op_threads=2, dim_ranges=(("height", 16, 32, 64),))
    ctx = BuildContext("/m.onnx", inputs, outputs, options, "fp16",
                       profile_for(inputs, 16, {"height": (16, 32, 64)}), gpu_probe.detect(), "7.5")
    again = BuildContext.from_dict(json.loads(json.dumps(ctx.to_dict())))
    assert again == ctx


def test_both_onnxruntime_builds_installed_is_reported(tmp_path: pathlib.Path) -> None:
    """onnxruntime and onnxruntime-gpu overwrite each other's module: doctor must say so."""
    import subprocess
    import sys

    dist = tmp_path / "onnxruntime_gpu-1.31.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    code = ("from engines import SystemProbe\n"
            "print('\\n'.join(SystemProbe(use_nvml=False, import_runtimes=False).detect().notes))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={"PYTHONPATH": f"{tmp_path}:{pathlib.Path(__file__).resolve().parents[2]}",
                              "PATH": "/usr/bin:/bin"})
    assert "both onnxruntime and onnxruntime-gpu are installed" in out.stdout
    clean = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "both onnxruntime" not in clean.stdout
