"""The agent's update latency and idle cost, on loopback, with real processes.

    python bench/agent_bench.py [--updates 20] [--idle-s 30]

1. Assignment to serving: a fleet and an enrolled agent (real `outpost fleet
   serve` / `outpost agent run` processes); N times, a new version of a small
   MLP (new weights, so a new download, install, verification and engine
   build each time) is assigned; the clock runs from the assignment PUT until
   the agent's `/v2/models/demo` lists only the new version. p50 and p95.
2. Idle cost: after the updates, the agent serving that one model with no
   traffic (long-poll open, heartbeats on their default period): CPU time
   over `--idle-s` seconds as % of one core, and RSS; then `outpost serve` on
   the same bundle, same threads, measured the same way, side by side.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import bundle
from cli.sample_model import sample_mlp
from tests.agent_daemon.conftest import make_version
from tests.agent_daemon.harness import OUTPOST, Agent, Fleet, Proc, free_port, http


def _served_only(agent: Agent, version: str) -> bool:
    status, meta = http("GET", f"{agent.url}/v2/models/demo", timeout_s=5)
    return status == 200 and meta.get("versions") == [version]


def _idle(pid: int, seconds: float) -> tuple[float, float]:
    """(% of one core over the window, RSS MiB at its end)."""
    p = psutil.Process(pid)
    c0, t0 = p.cpu_times(), time.monotonic()
    time.sleep(seconds)
    c1, t1 = p.cpu_times(), time.monotonic()
    used = (c1.user - c0.user) + (c1.system - c0.system)
    return 100.0 * used / (t1 - t0), p.memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--idle-s", type=float, default=30.0)
    args = ap.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="agent-bench-"))
    key, pub = bundle.generate_keys(root / "keys")
    (root / "bundles").mkdir()
    versions = [make_version(root / "bundles", key, "demo", f"1.{i}.0", sample_mlp(seed=i), release=1)
                for i in range(args.updates + 1)]
    fleet = Fleet(root / "fleet", pub)
    fleet.start()
    agent = Agent(root / "device", fleet, pub, sync__long_poll_s=25.0, sync__report_period_s=30.0,
                  update__health_runs=5, model__threads=1, model__inline_compute_ms=0.2)
    serve: Proc | None = None
    try:
        for v in versions:
            fleet.push(v.archive)
        agent.start()
        fleet.assign(agent.device_id, versions[0].ref)
        agent.wait_serving("demo", versions[0].version, timeout_s=120)
        took = []
        for v in versions[1:]:
            t0 = time.perf_counter()
            fleet.assign(agent.device_id, v.ref)
            while not _served_only(agent, v.version):
                time.sleep(0.005)
            took.append(time.perf_counter() - t0)
        time.sleep(3.0)
        assert agent.proc is not None
        agent_cpu, agent_rss = _idle(agent.proc.proc.pid, args.idle_s)
        last = versions[-1]
        agent.stop()
        port = free_port()
        serve = Proc([*OUTPOST, "serve", str(last.dir), "--trust", str(pub), "--port", str(port), "--threads", "1",
                      "--loop", "asyncio"])
        serve.wait_line("outpost serve: ready on ")
        time.sleep(3.0)
        serve_cpu, serve_rss = _idle(serve.proc.pid, args.idle_s)
    finally:
        if serve is not None:
            serve.stop()
        agent.kill()
        fleet.stop()
    q = statistics.quantiles(took, n=20)
    result = {
        "updates": len(took), "assign_to_serving_p50_s": round(statistics.median(took), 3),
        "assign_to_serving_p95_s": round(q[18], 3), "min_s": round(min(took), 3), "max_s": round(max(took), 3),
        "idle_window_s": args.idle_s,
        "agent_idle_cpu_percent_of_core": round(agent_cpu, 3), "serve_idle_cpu_percent_of_core": round(serve_cpu, 3),
        "agent_rss_mib": round(agent_rss, 1), "serve_rss_mib": round(serve_rss, 1),
        "rss_ratio_agent_over_serve": round(agent_rss / serve_rss, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
