"""The dashboard's devices page with 10,000 devices, and how fast a rollout decides once its data is in.

    .venv/bin/python bench/dashboard_bench.py [--devices 10000] [--requests 200]
                                              [--backend sqlite postgresql] [--decisions 10] [--period-s 2]

1. Devices page: 10,000 devices (heartbeat state, two labels, two telemetry
   points each) are written straight into the database, then a fleet process
   in this process serves `GET /dashboard/devices` (50 rows a page, random
   pages, half of them with a label filter) to a client logged in with a
   session cookie. Reported: server-side render time (the handler's own
   Server-Timing) and client-side request time, p50/p95/max.
2. Decision latency: simulated devices (tests/fleet/sim.py, real HTTP) report
   every `--period-s`; the engine evaluates every `--period-s` too. Each trial
   rolls out a version to one canary that needs one telemetry window
   (`min_requests` = one window, no soak): a good version is promoted, a bad
   one (p95 3x the SLO) halted. Latency = decision event time - arrival of the
   canary's first window that counts (its end after the canary was seen on the
   new version). The target is at most one report period.

PostgreSQL comes from OUTPOST_TEST_POSTGRES_URL or a private throwaway cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))] if s else float("nan")


@contextlib.contextmanager
def _database(backend: str, tmp: pathlib.Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp / 'fleet.db'}"
        return
    from fleet.config import normalise_db_url
    from tests.fleet.pg import postgres_database
    with postgres_database() as url:
        yield normalise_db_url(url)


async def _seed(db: Any, n: int) -> None:
    from sqlalchemy import insert

    from fleet.db import Device, DeviceLabel, TelemetryPoint
    now = time.time()
    rng = random.Random(1)
    for start in range(0, n, 2000):
        ids = range(start, min(n, start + 2000))
        async with db.transaction() as s:
            await s.execute(insert(Device), [
                {"id": f"d{i:06d}", "name": f"cam-{i:06d}", "credential_hash": f"{i:064x}", "enrolled_at": now,
                 "assignment_serial": 1, "assignment_changed_at": now, "last_seen_at": now - rng.random() * 60,
                 "state": {"agent_version": "0.2.0", "health": {"status": "ok"},
                           "hardware": {"gpu_name": "T4" if i % 3 else "Orin"},
                           "bundles": [{"ref": "demo@1.0.0", "active": True, "engine": "tensorrt"},
                                       {"ref": "ocr@2.1.0", "active": True, "engine": "cuda"}]}} for i in ids])
            await s.execute(insert(DeviceLabel), [
                {"device_id": f"d{i:06d}", "key": k, "value": v} for i in ids
                for k, v in (("site", f"site-{i % 20}"), ("hardware", "t4" if i % 3 else "orin"))])
            await s.execute(insert(TelemetryPoint), [
                {"device_id": f"d{i:06d}", "ts": now - k * 10, "resolution_s": 10,
                 "metrics": {"requests": 200.0, "cpu_percent": 30.0, "models.mlp.requests": 100.0,
                             "models.mlp.errors": 1.0, "models.mlp.p95_ms": 4.0 + rng.random(),
                             "models.ocr.requests": 100.0, "models.ocr.p95_ms": 9.0}}
                for i in ids for k in (0, 1)])


async def devices_page(backend: str, n: int, requests: int) -> dict[str, Any]:
    import aiohttp

    from fleet.api import FLEET
    from fleet.auth import create_operator_token
    from fleet.config import ServerConfig
    from fleet.server import start
    with tempfile.TemporaryDirectory(prefix="dash-bench-") as tmp_s, _database(backend, pathlib.Path(tmp_s)) as db:
        running = await start(ServerConfig(data_dir=pathlib.Path(tmp_s) / "data", db_url=db, port=0))
        try:
            fleet = running.runner.app[FLEET]
            await _seed(fleet.db, n)
            token = (await create_operator_token(fleet.db, "viewer", "bench"))[1]
            server_ms: list[float] = []
            client_ms: list[float] = []
            rng = random.Random(2)
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                async with http.get(running.url + "/dashboard/login") as r:
                    m = re.search(r'name="csrf" value="([^"]+)"', await r.text())
                    assert m
                async with http.post(running.url + "/dashboard/login", data={"token": token, "csrf": m.group(1)},
                                     allow_redirects=False) as r:
                    assert r.status == 302
                pages = n // 50
                for i in range(requests + 10):
                    q = f"?page={rng.randint(1, pages)}" if i % 2 else \
                        f"?page={rng.randint(1, max(1, pages // 20))}&label=site%3Dsite-{rng.randint(0, 19)}"
                    t0 = time.perf_counter()
                    async with http.get(running.url + "/dashboard/devices" + q) as r:
                        body = await r.text()
                        assert r.status == 200 and body.count("<tr>") == 51, (r.status, q)
                        app = float(r.headers["Server-Timing"].split("dur=")[1])
                    if i >= 10:  # the first few warm the caches
                        client_ms.append((time.perf_counter() - t0) * 1000)
                        server_ms.append(app)
        finally:
            await running.stop()
    return {"backend": backend, "devices": n, "requests": requests,
            "server_p50_ms": statistics.median(server_ms), "server_p95_ms": _pct(server_ms, 95),
            "server_max_ms": max(server_ms), "client_p50_ms": statistics.median(client_ms),
            "client_p95_ms": _pct(client_ms, 95)}


async def decisions(backend: str, trials: int, period_s: float) -> dict[str, Any]:
    import aiohttp
    from sqlalchemy import select

    import bundle
    from fleet.api import FLEET
    from fleet.auth import create_operator_token
    from fleet.config import RolloutConfig, ServerConfig
    from fleet.db import RolloutDevice
    from fleet.server import start
    from tests.fleet.sim import FleetLink, Simulation, enroll_fleet
    from tests.models.make_models import write_all

    def behaviour(ref: str, hw: str) -> tuple[float, float, float]:
        return (60.0 if ref == "demo@3.0.0" else 8.0), 0.0, 0.0

    with tempfile.TemporaryDirectory(prefix="dash-bench-") as tmp_s, _database(backend, pathlib.Path(tmp_s)) as db:
        tmp = pathlib.Path(tmp_s)
        write_all(tmp / "models")
        key, pub = bundle.generate_keys(tmp / "keys")
        running = await start(ServerConfig(data_dir=tmp / "data", db_url=db, port=0, trust_keys=(pub,),
                                           enroll_attempts_per_minute=1000,
                                           rollouts=RolloutConfig(eval_interval_s=period_s)))
        latencies: dict[str, list[float]] = {"promoted": [], "halted": []}
        try:
            fleet = running.runner.app[FLEET]
            admin = (await create_operator_token(fleet.db, "admin", "bench"))[1]
            async with aiohttp.ClientSession() as http:
                link = FleetLink(http, running.url)
                for v in ("1.0.0", "2.0.0", "3.0.0"):
                    d = tmp / f"demo-{v}"
                    bundle.build([tmp / "models" / "mlp.onnx"], d,
                                 bundle.BuildOptions(name="demo", version=v, slo_p95_ms=20.0))
                    bundle.sign_directory(d, key)
                    archive = bundle.pack(d, tmp / f"demo-{v}.tar.gz")
                    async with http.post(running.url + "/api/v1/bundles", data=archive.read_bytes(),
                                         headers={"Authorization": f"Bearer {admin}"}) as r:
                        models = (await r.json())["models"]
                devices = await enroll_fleet(link, admin, {"t4": 10}, {"demo": models}, behaviour, period_s)
                arrivals: dict[str, list[tuple[float, float]]] = {d.device_id: [] for d in devices}
                for d in devices:
                    await link._json("PUT", f"/api/v1/devices/{d.device_id}/assignment", admin,
                                     {"bundles": ["demo@1.0.0"]})
                    original = d.link.report

                    async def timed(device_id: str, cred: str, report: dict[str, Any], _o: Any = original) -> None:
                        await _o(device_id, cred, report)
                        for w in report.get("telemetry") or []:
                            arrivals[device_id].append((w["end"], time.time()))
                    d.link = FleetLink(http, running.url)
                    d.link.report = timed  # type: ignore[method-assign]
                sim = Simulation(devices)
                sim.start()
                await asyncio.sleep(2 * period_s)
                for i in range(trials):
                    ref = "demo@2.0.0" if i % 2 == 0 else "demo@3.0.0"
                    _, r = await link._json("POST", "/api/v1/rollouts", admin, {
                        "bundle": ref, "stages": [{"devices": 1}, {"percent": 100}], "soak_s": 0,
                        "min_requests": 1, "gates": {"failure_limit": 0, "max_p95_regression_pct": None}})
                    rid = r["id"]
                    want = "promoted" if ref == "demo@2.0.0" else "halted"
                    for _ in range(int(30 / 0.05)):
                        _, shown = await link._json("GET", f"/api/v1/rollouts/{rid}", admin)
                        done = next((e for e in shown["events"] if e["kind"] == want), None)
                        if done is not None:
                            break
                        await asyncio.sleep(0.05)
                    assert done is not None, shown["reason"]
                    async with fleet.db.read() as s:
                        canary = (await s.execute(select(RolloutDevice).where(RolloutDevice.rollout_id == rid,
                                                                              RolloutDevice.stage == 0))).scalar_one()
                    assert canary.converged_at is not None
                    first = min(at for end, at in arrivals[canary.device_id] if end > canary.converged_at)
                    latencies[want].append(done["at"] - first)
                    if shown["status"] == "running":
                        await link._json("POST", f"/api/v1/rollouts/{rid}/abort", admin)
                    for _ in range(200):  # every device back on 1.0.0 before the next trial
                        if all(d.active == ["demo@1.0.0"] for d in devices):
                            break
                        await asyncio.sleep(0.05)
                await sim.stop()
        finally:
            await running.stop()
    every = latencies["promoted"] + latencies["halted"]
    return {"backend": backend, "period_s": period_s, "trials": trials,
            **{f"{k}_{q}_s": (statistics.median(v) if q == "p50" else max(v)) for k, v in latencies.items() if v
               for q in ("p50", "max")},
            "max_s": max(every), "within_one_period": sum(x <= period_s for x in every), "of": len(every)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--backend", nargs="+", default=["sqlite", "postgresql"])
    ap.add_argument("--decisions", type=int, default=10)
    ap.add_argument("--period-s", type=float, default=2.0)
    args = ap.parse_args()
    out = []
    for backend in args.backend:
        page = asyncio.run(devices_page(backend, args.devices, args.requests))
        print(json.dumps(page), flush=True)
        dec = asyncio.run(decisions(backend, args.decisions, args.period_s))
        print(json.dumps(dec), flush=True)
        out.append((page, dec))
    print("\n| backend | devices | page render p50 | p95 | max | client p95 | decision p50 (promote / halt) | "
          "decision max | within one period |")
    print("|---|---|---|---|---|---|---|---|---|")
    for page, dec in out:
        print(f"| {page['backend']} | {page['devices']:,} | {page['server_p50_ms']:.1f} ms | "
              f"{page['server_p95_ms']:.1f} ms | {page['server_max_ms']:.1f} ms | {page['client_p95_ms']:.1f} ms | "
              f"{dec.get('promoted_p50_s', float('nan')):.2f} s / {dec.get('halted_p50_s', float('nan')):.2f} s | "
              f"{dec['max_s']:.2f} s | {dec['within_one_period']}/{dec['of']} (period {dec['period_s']:g} s) |")


if __name__ == "__main__":
    main()
