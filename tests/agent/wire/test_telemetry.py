"""System metrics: real psutil readings on this machine; GPU sources chosen at run time, absence included."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
import time
from types import ModuleType

from agent import telemetry
from agent.telemetry import JetsonGpu, NvmlGpu, Sampler, open_gpu
from contract import TelemetryWindow, build_report
from contract.report import SYSTEM_METRICS


def test_sample_has_the_report_schema_keys_with_plausible_values() -> None:
    s = Sampler(probe_gpu=False)
    busy_until = time.monotonic() + 0.2
    while time.monotonic() < busy_until:
        pass
    out = s.sample()
    assert set(out) <= set(SYSTEM_METRICS)
    assert {"cpu_percent", "memory_bytes", "memory_percent", "disk_free_bytes", "disk_percent"} <= set(out)
    assert all(math.isfinite(v) for v in out.values())
    assert 0 < out["cpu_percent"] <= 100 and 0 < out["memory_percent"] < 100
    assert 0 < out["memory_bytes"] < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    build_report(agent_version="0.1.0", time=time.time(), telemetry=[TelemetryWindow(0, 1, system=out)])


def test_module_sample_reuses_one_sampler() -> None:
    first = telemetry.sample()
    assert telemetry._default is not None
    kept = telemetry._default
    telemetry.sample()
    assert telemetry._default is kept and "cpu_percent" in first


def test_without_pynvml_there_is_no_nvml_source() -> None:
    def missing(name: str) -> ModuleType:
        raise ImportError(f"No module named {name!r}")

    assert NvmlGpu.open(import_module=missing) is None


def test_without_pynvml_or_jetson_sysfs_samples_carry_no_gpu_keys() -> None:
    """In a fresh interpreter where `import pynvml` fails, the sampler still works, without GPU figures."""
    code = ("import sys; sys.modules['pynvml'] = None\n"
            "from agent import telemetry\n"
            "assert telemetry.NvmlGpu.open() is None\n"
            "s = telemetry.Sampler(gpu=None, probe_gpu=False)\n"
            "out = s.sample()\n"
            "assert 'gpu_util_percent' not in out and 'cpu_percent' in out, out\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[3])})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_jetson_load_is_read_from_sysfs(tmp_path: pathlib.Path) -> None:
    load = tmp_path / "sys/devices/platform/gpu.0/load"
    load.parent.mkdir(parents=True)
    load.write_text("523\n")
    gpu = JetsonGpu.open(tmp_path)
    assert gpu is not None and gpu.read() == {"gpu_util_percent": 52.3}
    out = Sampler(gpu=gpu).sample()
    assert out["gpu_util_percent"] == 52.3 and "gpu_memory_bytes" not in out  # shared memory: not a GPU figure
    load.write_text("garbage")
    assert gpu.read() == {}
    assert JetsonGpu.open(tmp_path / "nothing") is None


def test_sources_are_tried_in_order_and_the_first_that_opens_wins(tmp_path: pathlib.Path) -> None:
    load = tmp_path / "sys/devices/gpu.0/load"
    load.parent.mkdir(parents=True)
    load.write_text("1000")
    tried: list[str] = []

    def none_source() -> None:
        tried.append("none")
        return None

    def jetson() -> JetsonGpu | None:
        tried.append("jetson")
        return JetsonGpu.open(tmp_path)

    gpu = open_gpu((none_source, jetson, none_source))
    assert isinstance(gpu, JetsonGpu) and tried == ["none", "jetson"]
    assert open_gpu((none_source,)) is None
