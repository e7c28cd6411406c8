"""Engines: what the engine layer costs per call, and what the engine cache saves per start.

    .venv/bin/python bench/engine_bench.py [--runs 3] [--iterations 4000] [--threads 0] [--workdir DIR]

1. `outpost engine bench BUNDLE --batch 1 --json` on the mlp, cnn and big test
   models: the engine's batch-1 p50 latency beside a bare
   `onnxruntime.InferenceSession.run` on the same model with the same thread
   settings, timed in alternating rounds in one process (engines/bench.py).
   Each model is benched `--runs` times in fresh processes; the median ratio
   is reported (1.00 = the engine layer adds nothing).
2. Cold build vs cache hit for the big model (~17 MB): a fresh process opens
   the engine with an empty cache (child-process build, parity check, commit,
   load), then another fresh process opens it again (hash check, load of the
   saved optimized model). Timed inside each process around `open_engine`,
   after `import onnxruntime` (which every serving process pays anyway).

Figures go to bench/README.md, section "Engines".
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("mlp", "cnn", "big")
#: calls per run = --iterations / SCALE: about the same wall time per model
SCALE = {"mlp": 1, "big": 4, "cnn": 40}

OPEN_ONCE = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import bundle, engines, onnxruntime  # imported before the clock starts: both sides pay it alike
b = bundle.load_unverified(sys.argv[1])
t = time.perf_counter()
r = engines.open_engine(b, cache_dir=sys.argv[2])
elapsed = time.perf_counter() - t
r.engine.close()
print(json.dumps({{"s": elapsed, "hit": r.cache_hit, "backend": r.backend}}))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def make_bundles(work: pathlib.Path) -> dict[str, pathlib.Path]:
    sys.path.insert(0, str(ROOT))
    import bundle
    from tests.models.make_models import write_all

    paths = write_all(work / "models")
    out = {}
    for name in MODELS:
        out[name] = work / "bundles" / name
        bundle.build([paths[name]], out[name], bundle.BuildOptions(name=name, version="1.0.0"))
    return out


def engine_vs_bare(bundle_dir: pathlib.Path, cache: pathlib.Path, iterations: int, threads: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "cli.main", "engine", "bench", str(bundle_dir), "--batch", "1", "--iterations",
           str(iterations), "--warmup", "200", "--threads", str(threads), "--cache", str(cache), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=_env())
    row = json.loads(proc.stdout)["rows"][0]
    return {"engine_ms": row["p50_ms"], "bare_ms": row["baseline_p50_ms"], "ratio": row["ratio"]}


def open_time(bundle_dir: pathlib.Path, cache: pathlib.Path) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", OPEN_ONCE.format(root=str(ROOT)), str(bundle_dir), str(cache)],
                          capture_output=True, text=True, check=True, cwd=ROOT, env=_env())
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--workdir", type=pathlib.Path, default=None)
    args = ap.parse_args()
    work = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="engine-bench-"))
    try:
        bundles = make_bundles(work)
        cache = work / "cache"
        print(f"== engine vs bare onnxruntime, batch 1, threads={args.threads}, median of {args.runs} runs")
        print(f"{'model':>6} {'engine p50 ms':>14} {'bare p50 ms':>12} {'ratio':>7}   per-run ratios")
        for name in MODELS:
            iterations = args.iterations // SCALE[name]
            runs = [engine_vs_bare(bundles[name], cache, iterations, args.threads) for _ in range(args.runs)]
            med = {k: statistics.median(r[k] for r in runs) for k in ("engine_ms", "bare_ms", "ratio")}
            per = ", ".join(f"{r['ratio']:.3f}" for r in runs)
            print(f"{name:>6} {med['engine_ms']:>14.4f} {med['bare_ms']:>12.4f} {med['ratio']:>7.3f}   {per}")

        print(f"== big model ({(bundles['big'] / 'models' / 'big.onnx').stat().st_size / 1e6:.1f} MB): "
              f"cold build vs cache hit, each in a fresh process, median of {args.runs}")
        cold, warm = [], []
        for i in range(args.runs):
            fresh = work / f"cold-cache-{i}"
            c = open_time(bundles["big"], fresh)
            w = open_time(bundles["big"], fresh)
            assert not c["hit"] and w["hit"], (c, w)
            cold.append(float(c["s"]))  # type: ignore[arg-type]
            warm.append(float(w["s"]))  # type: ignore[arg-type]
        mc, mw = statistics.median(cold), statistics.median(warm)
        print(f"cold build (child build + parity + commit + load): {mc * 1000:8.1f} ms   "
              f"runs: {', '.join(f'{v * 1000:.0f}' for v in cold)}")
        print(f"cache hit (hash check + load):                     {mw * 1000:8.1f} ms   "
              f"runs: {', '.join(f'{v * 1000:.0f}' for v in warm)}")
        print(f"cold / hit ratio: {mc / mw:.1f}x")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
