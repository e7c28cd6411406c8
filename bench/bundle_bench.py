"""Verify a 1 GiB bundle: time and peak RSS, side by side with a baseline process.

    .venv/bin/python bench/bundle_bench.py [--gib 1] [--workdir DIR]

The bundle holds a real ONNX model (a MatMul) whose 1 GiB weight lives in an
external-data file, the layout large models use. Each step runs in its own
child process so that its peak RSS (VmHWM) is its own; the baseline is a
child that only imports `bundle` and stops. Verification must stream: its
peak should stay near the baseline whatever the bundle size.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, pathlib
sys.path.insert(0, {root!r})
import bundle
step, args = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
if step == "verify":
    vb = bundle.verify(args[0], bundle.anchors([args[1]]))
    assert len(vb.files) == 3
elif step == "sign":
    bundle.sign_directory(args[0], args[1])
elif step == "baseline":
    pass
elapsed = time.perf_counter() - t
# VmHWM is this process image's own peak; ru_maxrss would include the parent's RSS at fork time.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"s": elapsed, "peak_rss_mib": hwm / 1024}}))
"""


def make_model(out: pathlib.Path, gib: float) -> pathlib.Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    n = int((gib * (1 << 30) / 4) ** 0.5)
    data = out / "weights.bin"
    with open(data, "wb") as f:
        row = np.random.default_rng(0).standard_normal(n).astype(np.float32).tobytes()
        for _ in range(n):
            f.write(row)
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [n, n])
    init = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[n, n], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "weights.bin"), ("offset", "0"), ("length", str(n * n * 4))):
        init.external_data.add(key=k, value=v)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], [init])
    del w
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = out / "big.onnx"
    onnx.save_model(model, str(path))
    return path


def child(step: str, *args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), step, *args],
                         capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import bundle

    work = pathlib.Path(tempfile.mkdtemp(prefix="outpost-bundle-bench-", dir=a.workdir))
    try:
        src = work / "src"
        src.mkdir()
        model = make_model(src, a.gib)
        key, pub = bundle.generate_keys(work / "keys")
        t = time.perf_counter()
        bundle.build([model], work / "b", bundle.BuildOptions(name="big", version="1.0.0"))
        build_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in (work / "b").rglob("*") if p.is_file())
        base = child("baseline")
        sign = child("sign", str(work / "b"), str(key))
        ver = child("verify", str(work / "b"), str(pub))
        rows = {
            "bundle_bytes": size, "build_s": round(build_s, 2),
            "sign_s": round(sign["s"], 2), "sign_peak_rss_mib": round(sign["peak_rss_mib"], 1),
            "verify_s": round(ver["s"], 2), "verify_peak_rss_mib": round(ver["peak_rss_mib"], 1),
            "baseline_peak_rss_mib": round(base["peak_rss_mib"], 1),
            "verify_throughput_mib_s": round(size / (1 << 20) / ver["s"], 1),
        }
        print(json.dumps(rows, indent=2))
        print(f"# host: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; "
              f"self peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
