"""Every engines module imports on a machine with neither ONNX Runtime nor TensorRT (nor their friends)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import importlib, importlib.abc, json, pkgutil, sys

BLOCKED = {"onnxruntime", "tensorrt", "polygraphy", "pycuda", "pynvml", "cuda", "cupy"}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked by the test")
        return None

sys.meta_path.insert(0, Blocker())
import engines
names = sorted(m.name for m in pkgutil.iter_modules(engines.__path__, "engines."))
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
hw = engines.SystemProbe().detect()
out = {"modules": names, "leaked": leaked, "ort": hw.onnxruntime_version, "trt": hw.tensorrt_version,
       "gpus": len(hw.gpus)}
import bundle, tempfile
try:
    engines.open_engine(bundle.load_unverified(sys.argv[1]), cache_dir=tempfile.mkdtemp())
except engines.BackendUnavailable as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def test_every_module_imports_without_any_runtime(make_bundle) -> None:  # type: ignore[no-untyped-def]
    path = make_bundle("mlp", sign=False)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {f"engines.{p.stem}" for p in (ROOT / "engines").glob("*.py") if p.stem != "__init__"}
    assert set(out["modules"]) == expected
    assert out["leaked"] == []
    assert out["ort"] is None and out["trt"] is None and out["gpus"] == 0
    assert "ort-cpu: onnxruntime is not installed" in out["error"]


@pytest.mark.parametrize("command", [["doctor"], ["engine", "--help"]])
def test_cli_answers_without_any_runtime(command: list[str]) -> None:
    script = _SCRIPT.split("import engines")[0] + "from cli.main import main\nmain(sys.argv[1:])\n"
    proc = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    if command == ["doctor"]:
        assert "onnxruntime:  not installed" in proc.stdout
