"""Heartbeats and telemetry: latest state, time series, validation, retention."""

from __future__ import annotations

import time
from typing import Any

from fleet.config import RetentionConfig
from fleet.reports import Reports, flatten_window, fold

from .conftest import Harness

HOUR = 3600


def _report(end: float, requests: int = 10, p99: float = 5.0) -> dict[str, Any]:
    return {
        "agent_version": "0.1.0",
        "hardware": {"cpu": "x86_64", "memory_bytes": 8e9, "gpu_name": "T4", "compute_capability": "7.5",
                     "driver": "550", "cuda": "12.4", "tensorrt": "10.3", "onnxruntime": "1.19"},
        "bundles": [{"ref": "demo@1.0.0", "active": True, "engine": "cpu",
                     "fallback_reasons": ["tensorrt: no GPU"]}],
        "health": {"status": "ok"},
        "telemetry": [{"start": end - 10, "end": end, "requests": requests, "errors": 1, "cpu_percent": 50,
                       "memory_bytes": 1e8, "temperature_c": 60,
                       "models": {"mlp": {"requests": requests, "p50_ms": 1, "p95_ms": 2, "p99_ms": p99}}}],
    }


async def test_report_updates_latest_state_and_series(api: Harness) -> None:
    device, cred = await api.enroll("d1")
    now = time.time()
    r = await api.call("POST", f"/api/v1/devices/{device}/reports", cred, json=_report(now))
    assert r.status == 202 and r.body["points"] == 1
    shown = (await api.call("GET", f"/api/v1/devices/{device}", api.admin)).body
    assert shown["agent_version"] == "0.1.0" and shown["health"] == "ok" and shown["active"] == ["demo@1.0.0"]
    assert shown["state"]["hardware"]["compute_capability"] == "7.5"
    assert shown["state"]["bundles"][0]["fallback_reasons"] == ["tensorrt: no GPU"]
    assert shown["last_seen_at"] >= now - 1
    series = (await api.call("GET", f"/api/v1/devices/{device}/telemetry?since={now - 60}", api.admin)).body
    assert len(series["points"]) == 1
    assert series["points"][0]["metrics"]["models.mlp.p99_ms"] == 5.0
    assert (await api.call("GET", f"/api/v1/devices/{device}/telemetry?since={now + 60}", api.admin)).body[
        "points"] == []


async def test_bad_reports_are_400_never_500(api: Harness) -> None:
    device, cred = await api.enroll("d1")
    path = f"/api/v1/devices/{device}/reports"
    bad_bodies: list[Any] = [
        b"{not json", b'{"telemetry": [{"requests": NaN}]}', b"[]", b'"x"',
        b'{"health": {"status": "splendid"}}', b'{"telemetry": [{"requests": -1}]}',
        b'{"bundles": [{"ref": "no-at-sign"}]}', b'{"unknown": 1}', b"[" * 10000,
    ]
    for body in bad_bodies:
        r = await api.call("POST", path, cred, data=body, headers={"Content-Type": "application/json"})
        assert r.status == 400, (body[:40], r.status)
        assert isinstance(r.body["error"], str) and "Traceback" not in r.body["error"]
    r = await api.call("POST", path, cred, data=b" " * (2 << 20) + b"{}",
                       headers={"Content-Type": "application/json"})
    assert r.status == 413
    too_many = {"telemetry": [{"requests": 1}] * 101}
    assert (await api.call("POST", path, cred, json=too_many)).status == 400


async def test_retention_folds_old_windows_and_drops_older_points(api: Harness) -> None:
    device, cred = await api.enroll("d1")
    base = 1_000 * HOUR  # an hour boundary, long ago
    windows = [_report(base + 10 * (i + 1), requests=10, p99=float(i))["telemetry"][0] for i in range(6)]
    r = await api.call("POST", f"/api/v1/devices/{device}/reports", cred, json={"telemetry": windows})
    assert r.body["points"] == 6
    reports = Reports(api.fleet.db, RetentionConfig(raw_retention_s=HOUR, downsampled_retention_s=10 * HOUR))
    folded, dropped = await reports.maintain(now=base + 3 * HOUR)
    assert (folded, dropped) == (6, 0)
    points = await reports.series(device, None, None, 100)
    assert len(points) == 1 and points[0]["resolution_s"] == HOUR and points[0]["ts"] == base + HOUR
    m = points[0]["metrics"]
    assert m["requests"] == 60 and m["models.mlp.requests"] == 60 and m["errors"] == 6
    assert m["models.mlp.p99_ms"] == 5.0 and m["cpu_percent"] == 50.0
    assert await reports.maintain(now=base + 3 * HOUR) == (0, 0)  # idempotent
    assert await reports.maintain(now=base + 20 * HOUR) == (0, 1)
    assert await reports.series(device, None, None, 100) == []


def test_fold_sums_counters_maxes_percentiles_averages_gauges() -> None:
    a = flatten_window({"requests": 3, "cpu_percent": 10, "models": {"m": {"p99_ms": 4, "errors": 1}}})
    b = flatten_window({"requests": 5, "cpu_percent": 30, "models": {"m": {"p99_ms": 9, "errors": 2}}})
    assert fold([a, b]) == {"requests": 8, "cpu_percent": 20, "models.m.p99_ms": 9, "models.m.errors": 3}
    assert flatten_window({"requests": float("nan"), "cpu_percent": True}) == {}


async def test_reporting_a_revoked_bundle_bumps_the_serial_and_lists_it(api: Harness, make_bundle: Any) -> None:
    assert (await api.push(make_bundle("mlp", name="demo", version="1.0.0"))).status == 201
    await api.call("POST", "/api/v1/bundles/demo/1.0.0/revoke", api.admin, json={"reason": "bad"})
    device, cred = await api.enroll("late")
    path = f"/api/v1/devices/{device}/assignment"
    assert (await api.call("GET", path, cred)).body["document"]["serial"] == 0
    report = {"bundles": [{"ref": "demo@1.0.0", "active": True}]}
    assert (await api.call("POST", f"/api/v1/devices/{device}/reports", cred, json=report)).status == 202
    doc = (await api.call("GET", path, cred)).body["document"]
    assert doc["serial"] == 1 and doc["revoked"] == ["demo@1.0.0"]
    # the same report again changes nothing
    await api.call("POST", f"/api/v1/devices/{device}/reports", cred, json=report)
    assert (await api.call("GET", path, cred)).body["document"]["serial"] == 1


async def test_batched_reports_store_everything_and_isolate_a_bad_one(api: Harness, make_bundle: Any) -> None:
    import asyncio

    from sqlalchemy import func, select

    from fleet.db import DeviceBundle, TelemetryPoint
    from fleet.errors import NotFound
    from fleet.ingest import ReportBatcher
    assert (await api.push(make_bundle("mlp", name="demo", version="1.0.0"))).status == 201
    await api.call("POST", "/api/v1/bundles/demo/1.0.0/revoke", api.admin, json={})
    devices = [await api.enroll(f"d{i}") for i in range(6)]
    batcher = ReportBatcher(api.fleet.db, api.fleet.reports)
    now = time.time()
    jobs = []
    for i, (device, _) in enumerate(devices):
        for k in range(5):
            report = _report(now - k, requests=k)
            report["bundles"] = [{"ref": "demo@1.0.0" if i < 2 else f"ok@1.0.{i}", "active": True}]
            jobs.append(batcher.submit(device, report))
    jobs.append(batcher.submit("no-such-device", _report(now)))
    results = await asyncio.gather(*jobs, return_exceptions=True)
    await batcher.close()
    assert isinstance(results[-1], NotFound)
    assert all(r[0] == 1 for r in results[:-1] if isinstance(r, tuple)) and len(
        [r for r in results if isinstance(r, tuple)]) == 30
    async with api.fleet.db.read() as s:
        assert (await s.execute(select(func.count()).select_from(TelemetryPoint))).scalar_one() == 30
        assert (await s.execute(select(func.count()).select_from(DeviceBundle))).scalar_one() == 6
    serials = [(await api.call("GET", f"/api/v1/devices/{d}/assignment", c)).body["document"]
               for d, c in devices]
    # the two devices that reported the revoked bundle were told, exactly once each
    assert [(doc["serial"], doc["revoked"]) for doc in serials] == [(1, ["demo@1.0.0"])] * 2 + [(0, [])] * 4
