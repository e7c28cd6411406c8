"""Where a small request's CPU goes inside `outpost serve`: cProfile on the live server under wrk.

    .venv/bin/python bench/profile_serve.py [--concurrency 1] [--duration 5] [--top 30] [--body json|binary]

Builds the MLP bundle, serves it in this process (the same DataPlane + HttpServer
that `outpost serve` runs, uvloop), loads it with wrk from a child process and
prints the functions with the most own time per request, profiled only while wrk runs.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pathlib
import pstats
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving import payloads, wrk  # noqa: E402


async def _profile(args: argparse.Namespace, work: pathlib.Path) -> str:
    import bundle
    from agent.config import ModelConfig, ServerConfig
    from agent.dataplane import DataPlane
    from agent.http_server import HttpServer
    from engines import EngineOptions
    from tests.models.make_models import write_all

    models = write_all(work / "models")
    dest = work / "bundle-mlp"
    bundle.build([models["mlp"]], dest, bundle.BuildOptions(name="mlp", version="1.0.0", max_batch_size=32,
                                                            max_queue_delay_ms=2.0))
    dp = DataPlane()
    dp.load_bundle(bundle.load_unverified(dest),
                   ModelConfig(inline_compute_ms=0.2, engine_options=EngineOptions(allow_spinning=False)))
    server = HttpServer(dp, ServerConfig(port=0))
    await server.start()
    bodies = payloads.make(work, "mlp", "input", np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32))
    p = bodies["v2-json" if args.body == "json" else "v2-binary"]
    url = f"{server.url}/v2/models/mlp/infer"
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, wrk.run, url, p.path, p.content_type, 8, 1.0, p.header_length)
    prof = cProfile.Profile()
    prof.enable()
    res = await loop.run_in_executor(None, wrk.run, url, p.path, p.content_type, args.concurrency, args.duration,
                                     p.header_length)
    prof.disable()
    await server.stop()
    out = io.StringIO()
    print(f"{res.requests} requests, {res.requests_per_s:,.0f} req/s under the profiler", file=out)
    pstats.Stats(prof, stream=out).sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(args.top)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--body", choices=("json", "binary"), default="json")
    args = ap.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory(prefix="profile-serve-") as tmp:
        print(uvloop.run(_profile(args, pathlib.Path(tmp))))


if __name__ == "__main__":
    main()
