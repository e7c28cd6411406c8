"""Behaviour under load: no full collections while serving, stalls named in the log, herds spread by 503."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fleet import gcpolicy
from fleet.stalls import StallWatch

from .conftest import Harness


@contextlib.contextmanager
def _gc_state() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _full_collections_while(work: Any) -> int:
    seen: list[int] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(on_gc)
    try:
        work()
    finally:
        gc.callbacks.remove(on_gc)
    return len(seen)


def _grow_long_lived_objects() -> None:
    """What thousands of held long-polls do: objects that survive young collections, then die later."""
    kept: list[Any] = []
    for _ in range(30):
        kept.append([{"request": [i], "timer": (i,)} for i in range(10_000)])
        if len(kept) > 10:
            kept.pop(0)


def test_serving_turns_automatic_full_collections_off() -> None:
    with _gc_state():
        assert _full_collections_while(_grow_long_lived_objects) > 0  # what CPython does by default
        gcpolicy.tune_for_serving()
        assert gc.get_freeze_count() > 0
        assert _full_collections_while(_grow_long_lived_objects) == 0


async def test_the_fleet_runs_full_collections_itself(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleet.gcpolicy")
    task = asyncio.create_task(gcpolicy.full_collections(0.05))
    deadline = time.monotonic() + 10
    while sum("full garbage collection" in r.message for r in caplog.records) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert sum("full garbage collection" in r.message for r in caplog.records) >= 2


async def test_a_stall_is_logged_with_the_collectors_share(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleet.stalls")
    watch = StallWatch(tick_s=0.02, warn_ms=100)
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(0.1)
    time.sleep(0.25)  # the loop is held: nothing else runs
    await asyncio.sleep(0.1)
    garbage = [[i] for i in range(200_000)]
    gc.collect()
    del garbage
    await asyncio.sleep(0.1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    stalls = [r.getMessage() for r in caplog.records if "event loop stalled" in r.getMessage()]
    assert stalls and int(stalls[0].split()[3]) >= 200, stalls
    assert watch.gc_runs.get(2, 0) >= 1
    assert any("garbage collections while serving" in r.getMessage() for r in caplog.records)


async def test_a_cold_device_is_told_to_come_back_later_when_the_database_is_saturated(api: Harness) -> None:
    warm, warm_cred = await api.enroll("warm")
    cold, cold_cred = await api.enroll("cold")
    report = {"health": {"status": "ok"}}
    assert (await api.call("POST", f"/api/v1/devices/{warm}/reports", warm_cred, json=report)).status == 202
    assert (await api.call("GET", f"/api/v1/devices/{warm}/assignment?serial=0&wait_s=0", warm_cred)).status == 200

    db, admission = api.fleet.db, api.fleet.admission
    release = asyncio.Event()
    opened = 0

    async def hold() -> None:
        nonlocal opened
        async with db.read():
            opened += 1
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(admission.max_in_flight)]
    try:
        while opened < len(holders):
            await asyncio.sleep(0.01)
        for path, body in [(f"/api/v1/devices/{cold}/reports", report), (f"/api/v1/devices/{cold}/assignment", None)]:
            r = await api.call("POST" if body else "GET", path, cold_cred, json=body)
            assert r.status == 503, (path, r.status, r.body)
            assert "busy" in r.body["error"] and 1 <= int(r.headers["Retry-After"]) <= admission.spread_s
        # a device the fleet already knows needs no database work to be served: never refused
        r = await api.call("POST", f"/api/v1/devices/{warm}/reports", warm_cred, json=report)
        # (its report still waits for the writer, which is free: held sessions are readers)
        assert r.status == 202, r.body
    finally:
        release.set()
        await asyncio.gather(*holders)
    assert (await api.call("POST", f"/api/v1/devices/{cold}/reports", cold_cred, json=report)).status == 202


async def test_a_full_report_queue_answers_503_with_a_jittered_retry_after(api: Harness) -> None:
    device, cred = await api.enroll("queued")
    api.fleet.report_batcher.max_pending = 0
    delays = set()
    for _ in range(8):
        r = await api.call("POST", f"/api/v1/devices/{device}/reports", cred, json={"health": {"status": "ok"}})
        assert r.status == 503 and "reports queued" in r.body["error"]
        delays.add(int(r.headers["Retry-After"]))
    assert len(delays) > 1  # spread, not one herd coming back together


async def test_a_herd_is_told_to_come_back_later_while_the_event_loop_lags(api: Harness) -> None:
    admission = api.fleet.admission
    admission.herd_per_s = 3
    devices = [await api.enroll(f"herd-{i}") for i in range(4)]
    await asyncio.sleep(0.2)  # the stall watch is ticking
    time.sleep(0.3)  # the loop is held, as a saturated fleet's is
    await asyncio.sleep(0.1)
    assert api.fleet.stall_watch.recent_lag_ms >= admission.max_lag_ms
    statuses = []
    for device, cred in devices:  # one lagging moment alone refuses nobody; a herd arriving in it is spread
        r = await api.call("POST", f"/api/v1/devices/{device}/reports", cred, json={"health": {"status": "ok"}})
        statuses.append(r.status)
        if r.status == 503:
            assert 1 <= int(r.headers["Retry-After"]) <= admission.spread_s
    assert statuses[:2] == [202, 202] and statuses[-1] == 503, statuses
    device, cred = devices[-1]
    deadline = time.monotonic() + 10
    while api.fleet.stall_watch.recent_lag_ms >= api.fleet.admission.max_lag_ms and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    r = await api.call("POST", f"/api/v1/devices/{device}/reports", cred, json={"health": {"status": "ok"}})
    assert r.status == 202, r.body


def test_a_herd_straddling_a_clock_second_is_still_a_herd(api: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted per calendar second, arrivals at 10.8, 10.9, 11.0 and 11.1 looked like 2 and 2."""
    import fleet.admission
    from fleet.errors import Busy

    watch = StallWatch()
    watch.recent_lag_ms = 1000.0  # the loop lags throughout
    admission = fleet.admission.Admission(api.fleet.db, watch, herd_per_s=3)
    now = [10.8]
    monkeypatch.setattr(fleet.admission.time, "monotonic", lambda: now[0])
    for t in (10.8, 10.9, 11.0):
        now[0] = t
        admission.admit_cold("x")  # three a second are not yet a herd
    now[0] = 11.1
    with pytest.raises(Busy):
        admission.admit_cold("x")  # three others within the last second: a herd, across the clock second
    now[0] = 12.05
    admission.admit_cold("x")  # the herd has passed: only 11.1 lies in the last second
    watch.recent_lag_ms = 0.0
    for t in (12.3, 12.31, 12.32, 12.33):
        now[0] = t
        admission.admit_cold("x")  # a herd alone refuses nobody while the loop keeps up
