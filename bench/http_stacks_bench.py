"""HTTP stacks side by side on the same handler, and `outpost serve`, by server CPU per request.

    .venv/bin/python bench/http_stacks_bench.py [--duration 4] [--repeats 3] [--lib DIR] [--body json|binary]

Each stack (bench/serving/stacks.py: the floor, a uvloop protocol answering every request
with a canned reply and doing no work (what wrk and the kernel cost); aiohttp application + router, aiohttp's
low-level server, uvicorn + httptools with a raw ASGI app, granian RSGI, two
aiohttp processes on one port) serves the MLP ([1,64] -> 10) with the same work
per request; `outpost serve` (unverified bundle, as shipped otherwise) beside
them. Load from wrk on loopback at c=1 and c=64, servers in rotation; server
CPU per request is the CPU time of the server's process tree over the wrk run
divided by the requests answered (steadier than req/s on a shared machine).
uvicorn, httptools and granian are bench-only: install them into a directory
and pass it with --lib (pip install --target DIR granian uvicorn httptools).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving import payloads, quiet, servers, wrk  # noqa: E402

STACKS = ("floor", "aiohttp-app", "aiohttp-lowlevel", "uvicorn-httptools", "granian-rsgi", "aiohttp-reuseport-2")
OUTPOST = "outpost serve"
BEFORE = "outpost serve (before)"


def spec(name: str, model: pathlib.Path, bundle_dir: pathlib.Path, lib: str | None,
         before: pathlib.Path | None) -> servers.ServerSpec:
    port = servers.free_port()
    py = sys.executable
    env = {"PYTHONPATH": os.pathsep.join(p for p in (lib, str(ROOT / "bench"), str(ROOT)) if p),
           "BENCH_MODEL": str(model)}
    url = f"http://127.0.0.1:{port}"
    if name in (OUTPOST, BEFORE):
        root = before if name == BEFORE and before is not None else ROOT
        return servers.ServerSpec(name, [py, "-m", "cli.main", "serve", str(bundle_dir), "--port", str(port)],
                                  f"{url}/v2/health/ready", {"json": (f"{url}/v2/models/mlp/infer", "v2-json"),
                                                             "binary": (f"{url}/v2/models/mlp/infer", "v2-binary")},
                                  env={"PYTHONPATH": str(root)}, cwd=root)
    if name == "granian-rsgi":
        argv = [py, "-m", "granian", "--interface", "rsgi", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1", "--loop", "uvloop", "--no-log", "serving.stacks:rsgi_app"]
    else:
        argv = [py, str(ROOT / "bench" / "serving" / "stacks.py"), name, str(model), str(port)]
    return servers.ServerSpec(name, argv, f"{url}/ready", {"json": (f"{url}/infer", "v2-json")}, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lib", help="directory holding uvicorn, httptools, granian (pip install --target)")
    ap.add_argument("--stacks", default=",".join((*STACKS, OUTPOST)))
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--before", type=pathlib.Path,
                    help="a checkout of outpost before the change (git archive ... | tar -x -C DIR): "
                         f"served beside this one as {BEFORE!r}")
    args = ap.parse_args()
    import bundle
    from tests.models.make_models import mlp

    names = args.stacks.split(",") + ([BEFORE] if args.before else [])
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="stacks-bench-") as tmp:
        work = pathlib.Path(tmp)
        import onnx

        model = work / "mlp.onnx"
        onnx.save(mlp(), model)
        bundle_dir = work / "bundle-mlp"
        bundle.build([model], bundle_dir, bundle.BuildOptions(name="mlp", version="1.0.0", max_batch_size=32,
                                                               max_queue_delay_ms=2.0))
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        bodies = payloads.make(work, "mlp", "input", x)
        running: list[servers.Running] = []
        cells: dict[tuple[str, int], dict[str, list[float]]] = {}
        try:
            for n in names:
                log_path = work / f"{n.replace(' ', '_')}.log"
                r = servers.Running(spec(n, model, bundle_dir, args.lib, args.before), log_path)
                r.measure_idle()
                running.append(r)
                print(f"{n}: ready in {r.start_to_ready_s:.2f} s, idle RSS {r.idle_rss / 2**20:.0f} MiB", flush=True)
                url, key = r.spec.routes["json"]
                wrk.run(url, bodies[key].path, bodies[key].content_type, 8, 1.0)  # warm-up
            for c in levels:
                for rep in range(args.repeats):
                    order = running[rep % len(running):] + running[:rep % len(running)]
                    for r in order:
                        url, key = r.spec.routes["json"]
                        p = bodies[key]
                        probe = quiet.ForeignLoad(lambda: sum(x.cpu_s() for x in running))
                        probe.start()
                        cpu0 = r.cpu_s()
                        res = wrk.run(url, p.path, p.content_type, c, args.duration)
                        cpu_s = r.cpu_s() - cpu0
                        foreign = probe.stop()
                        cell = cells.setdefault((r.spec.name, c), {})
                        for k, v in (("rps", res.requests_per_s), ("p50", res.p50_ms), ("p99", res.p99_ms),
                                     ("cpu_ms", cpu_s * 1000 / max(res.requests, 1)),
                                     ("cores", cpu_s / args.duration), ("errors", res.errors),
                                     ("others", foreign)):
                            cell.setdefault(k, []).append(v)
                        print(f"  c={c} {r.spec.name}: {res.requests_per_s:,.0f} req/s p50 {res.p50_ms:.2f} "
                              f"p99 {res.p99_ms:.2f} ms, {cpu_s * 1000 / max(res.requests, 1):.3f} ms CPU/req on "
                              f"{cpu_s / args.duration:.2f} cores, errors {res.errors}, others {foreign:.2f}",
                              flush=True)
        finally:
            for r in running:
                r.stop()
    print("\n| stack | c | req/s | p50 ms | p99 ms | server CPU ms/req (median, min-max) | server cores | "
          "errors | idle RSS MiB | start to ready s |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for c in levels:
        for r in running:
            cell = cells[(r.spec.name, c)]
            med = {k: statistics.median(v) for k, v in cell.items()}
            print(f"| {r.spec.name} | {c} | {med['rps']:,.0f} | {med['p50']:.2f} | {med['p99']:.2f} | "
                  f"{med['cpu_ms']:.3f} ({min(cell['cpu_ms']):.3f}-{max(cell['cpu_ms']):.3f}) | {med['cores']:.2f} | "
                  f"{sum(cell['errors']):.0f} | {r.idle_rss / 2**20:.0f} | {r.start_to_ready_s:.2f} |")


if __name__ == "__main__":
    main()
