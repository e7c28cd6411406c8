"""Gate figures summed by the database, per hardware kind, on SQLite and PostgreSQL."""

from __future__ import annotations

import pathlib
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import insert

from fleet.db import Device, Rollout, RolloutDevice, TelemetryPoint
from fleet.rollouts import figures
from fleet.service import Fleet

from .conftest import server_config


@pytest.fixture
async def fleet(db_url: str, tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path]
                ) -> AsyncIterator[Fleet]:
    f = await Fleet.open(server_config(tmp_path / "data", db_url, keypair[1]))
    try:
        yield f
    finally:
        await f.close()


async def test_stage_and_baseline_aggregates(fleet: Fleet) -> None:
    now = time.time()
    async with fleet.db.transaction() as s:
        await s.execute(insert(Device), [{"id": d, "name": d, "credential_hash": d * 16, "enrolled_at": now,
                                          "assignment_serial": 0, "assignment_changed_at": now}
                                         for d in ("a", "b", "c", "late")])
        await s.execute(insert(Rollout), [{
            "id": "r", "bundle_name": "demo", "bundle_version": "2", "spec": {}, "status": "running", "stage": 0,
            "stage_started_at": now - 100, "failed_evaluations": 0, "reason": "", "created_at": now,
            "created_by": "t", "updated_at": now, "version": 0, "lease_until": 0.0, "settled": False}])
        await s.execute(insert(RolloutDevice), [
            {"rollout_id": "r", "device_id": d, "stage": 0, "hardware": hw, "assigned_at": now - 100,
             "converged_at": conv} for d, hw, conv in (("a", "t4", now - 90), ("b", "t4", now - 90),
                                                       ("c", "orin", now - 50), ("late", "orin", None))])

        def point(d: str, ts: float, **m: float) -> dict[str, object]:
            return {"device_id": d, "ts": ts, "resolution_s": 10, "metrics": m}
        await s.execute(insert(TelemetryPoint), [
            point("a", now - 80, **{"models.m1.requests": 100, "models.m1.p95_ms": 10, "models.m1.errors": 1,
                                    "models.m2.requests": 100, "models.m2.p95_ms": 30,
                                    "models.m1.metrics.score": 0.5, "models.m2.metrics.score": 1.0}),
            point("b", now - 70, **{"models.m1.requests": 200, "models.m1.p95_ms": 20, "models.m1.nan_count": 2}),
            point("b", now - 95, **{"models.m1.requests": 999, "models.m1.p95_ms": 999}),   # before converging
            point("c", now - 60, **{"models.m1.requests": 50, "models.m1.p95_ms": 90}),      # before converging
            point("c", now - 40, **{"models.m1.requests": 50, "models.m1.p95_ms": 60, "models.other.requests": 7}),
            point("late", now - 30, **{"models.m1.requests": 500, "models.m1.p95_ms": 1}),   # not converged
            point("a", now - 20, **{"cpu_percent": 50}),                                    # no model figures
        ])
    async with fleet.db.read() as s:
        got = await figures.stage_aggregates(s, "r", now - 100, ("m1", "m2"), ("score",))
        base = await figures.device_aggregates(s, ["a", "b", "c"], now - 200, ("m1",), ())
    t4, orin = got["t4"], got["orin"]
    assert (t4.requests, t4.errors, t4.nan_count, t4.devices) == (400, 1, 2, 2)
    assert t4.p95_ms == pytest.approx((10 * 100 + 30 * 100 + 20 * 200) / 400) and t4.p95_max == 30
    assert t4.metrics["score"] / t4.requests == pytest.approx((0.5 * 100 + 1.0 * 100) / 400)
    assert (orin.requests, orin.p95_ms, orin.devices) == (50, 60, 1)
    assert set(base) == {"a", "b", "c"} and base["b"].requests == 1199 and base["c"].p95_max == 90
    async with fleet.db.read() as s:  # a later stage only counts what came after it started
        assert set(await figures.stage_aggregates(s, "r", now - 50, ("m1",), ())) == {"orin"}
