"""Engine instances x intra-op threads on the CPU: which split serves the CNN best, side by side in one run.

    python bench/instances_bench.py [--duration 3] [--repeats 2] [--configs default,1x0,2x1,2x2]

One `outpost serve --shared-memory` per configuration (the ~1 GFLOP CNN, 224x224,
signed bundle, batching as bench/serving_bench.py), all started up front and
loaded in rotating order so machine drift hits them alike:

- c=8, image in shared memory: images/s over bare ONNX Runtime's best (batch 1
  or 8, one session with its default threads) measured right before each run;
- c=1: p50 latency over bare ORT's batch-1 time (1000 / its batch-1 images/s)
  measured in the same place: what a single request pays for the configuration.

Then the MLP ([1,64] -> 10) under each configuration, idle: its RSS against the
minimal aiohttp server's (bench/serving/minimal_server.py), i.e. what unused
instances would cost a tiny model. `default` is `outpost serve` with neither
--instances nor --threads (the auto policy, agent/instances.py); `AxT` is
`--instances A --threads T`. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import urllib.request
from multiprocessing import shared_memory

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import serving_bench  # noqa: E402
from serving import quiet, servers, wrk  # noqa: E402
from shm_bench import register, shm_body  # noqa: E402


def config_args(name: str) -> list[str]:
    if name == "default":
        return []
    instances, _, threads = name.partition("x")
    return ["--instances", instances, "--threads", threads]


def spec(model: str, bundle_dir: pathlib.Path, pub: pathlib.Path, extra: list[str]) -> servers.ServerSpec:
    port = servers.free_port()
    return servers.ServerSpec(
        f"outpost serve {' '.join(extra)} ({model})",
        [sys.executable, "-m", "cli.main", "serve", str(bundle_dir), "--trust", str(pub), "--port", str(port),
         "--shared-memory", *extra],
        f"http://127.0.0.1:{port}/v2/health/ready", {}, cwd=ROOT)


def metadata(base: str, model: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{base}/v2/models/{model}", timeout=10) as r:
        doc = json.loads(r.read())
    return dict(doc.get("outpost", {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default="default,1x0,2x1,2x2")
    quiet.add_arguments(ap, retries=0, quiet_wait_s=None)
    args = ap.parse_args()
    if not wrk.available():
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    configs = args.configs.split(",")
    print(f"load average {os.getloadavg()}; other processes use {quiet.wait_for_quiet(0.3, 10):.2f} cores",
          flush=True)
    img = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    region = shared_memory.SharedMemory(create=True, size=img.nbytes)
    np.ndarray(img.shape, img.dtype, buffer=region.buf)[:] = img
    running: dict[str, servers.Running] = {}
    of_bare: dict[tuple[str, int], list[float]] = {}
    p50: dict[str, list[float]] = {}
    rss: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="instances-bench-") as tmp:
            work = pathlib.Path(tmp)
            models, bundles, pub = serving_bench.build_models(work)
            # MLP idle RSS first, one server at a time (nothing else loaded)
            port = servers.free_port()
            minimal = servers.Running(servers.ServerSpec(
                "minimal", [sys.executable, str(ROOT / "bench" / "serving" / "minimal_server.py"),
                            str(models["mlp"]), str(port)], f"http://127.0.0.1:{port}/ready", {}), work / "min.log")
            minimal.measure_idle()
            minimal.stop()
            rss["minimal aiohttp"] = minimal.idle_rss / 2**20
            for name in configs:
                r = servers.Running(spec("mlp", bundles["mlp"], pub, config_args(name)), work / f"mlp-{name}.log")
                r.measure_idle()
                meta = metadata(r.spec.ready_url.removesuffix("/v2/health/ready"), "mlp")
                r.stop()
                rss[f"mlp {name} ({meta.get('instances')} inst, {meta.get('threads', '?')} thr)"] = r.idle_rss / 2**20
            url: dict[str, str] = {}
            for name in configs:
                r = servers.Running(spec("cnn", bundles["cnn"], pub, config_args(name)), work / f"cnn-{name}.log")
                running[name] = r
                base = r.spec.ready_url.removesuffix("/v2/health/ready")
                register(base, "image", region)
                url[name] = f"{base}/v2/models/cnn/infer"
                print(f"  cnn {name}: {metadata(base, 'cnn')}", flush=True)
            body = shm_body(work / "cnn.shm.json", "image", img, "image", None)
            for name in configs:  # warm-up
                wrk.run(url[name], body.path, body.content_type, 8, 1.0)
            for rep in range(args.repeats):
                order = configs[rep % len(configs):] + configs[:rep % len(configs)]
                for name in order:
                    for c in (8, 1):
                        bare = serving_bench.bare_ort(models["cnn"], (1, 8), 1.0)
                        res, cpu_ms, foreign = serving_bench.measure(running[name], list(running.values()),
                                                                     url[name], body, c, args.duration, args)
                        if c == 8:
                            ratio = res.requests_per_s / max(bare.values())
                        else:
                            ratio = res.p50_ms / (1000.0 / bare[1])
                            p50.setdefault(name, []).append(res.p50_ms)
                        of_bare.setdefault((name, c), []).append(ratio)
                        print(f"  {name} c={c}: {res.requests_per_s:.1f} req/s, p50 {res.p50_ms:.2f} ms, "
                              f"CPU {cpu_ms:.2f} ms/req, bare b1 {bare[1]:.0f}/s b8 {bare[8]:.0f}/s -> "
                              f"{ratio:.2f}x, others {foreign:.2f} cores, errors {res.errors}", flush=True)
    finally:
        for r in running.values():
            r.stop()
        region.close()
        region.unlink()
    med = statistics.median
    print(f"\nwhole run {time.monotonic() - t0:.0f} s; load average now {os.getloadavg()}")
    print("| config | c=8 images/s over bare ORT best | c=1 p50 over bare ORT batch-1 time | c=1 p50 ms |")
    print("|---|---:|---:|---:|")
    for name in configs:
        print(f"| {name} | {med(of_bare[(name, 8)]):.2f}x | {med(of_bare[(name, 1)]):.2f}x | {med(p50[name]):.2f} |")
    print("\n| server, MLP bundle, idle | RSS MiB |\n|---|---:|")
    for k, v in rss.items():
        print(f"| {k} | {v:.1f} |")


if __name__ == "__main__":
    main()
