"""The dashboard over plain HTTP (the browser test covers the same pages in Chromium): auth, CSRF, paging."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest
from sqlalchemy import insert

from fleet.db import Device, DeviceLabel, TelemetryPoint
from tests.conftest import MakeBundle

from .conftest import Harness


def _browser() -> aiohttp.ClientSession:
    """A client that keeps cookies like a browser would (unsafe=True: the fleet is on an IP address)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _login(api: Harness, http: aiohttp.ClientSession, token: str) -> None:
    async with http.get(api.url + "/dashboard/login") as r:
        csrf = re.search(r'name="csrf" value="([^"]+)"', await r.text())
        assert csrf
    async with http.post(api.url + "/dashboard/login", data={"token": token, "csrf": csrf.group(1)},
                         allow_redirects=False) as r:
        assert r.status == 302, await r.text()


async def _seed(api: Harness, n: int) -> None:
    now = time.time()
    async with api.fleet.db.transaction() as s:
        await s.execute(insert(Device), [
            {"id": f"d{i:05d}", "name": f"cam-{i:05d}", "credential_hash": f"{i:064x}", "enrolled_at": now,
             "assignment_serial": 0, "assignment_changed_at": now, "last_seen_at": now,
             "state": {"agent_version": "0.2.0", "health": {"status": "ok" if i % 7 else "degraded"},
                       "bundles": [{"ref": "demo@1.0.0", "active": True, "engine": "cuda"}]}} for i in range(n)])
        await s.execute(insert(DeviceLabel), [{"device_id": f"d{i:05d}", "key": "site",
                                               "value": "north" if i % 2 else "south"} for i in range(n)])
        await s.execute(insert(TelemetryPoint), [
            {"device_id": f"d{i:05d}", "ts": now - k, "resolution_s": 10,
             "metrics": {"models.mlp.requests": 100.0, "models.mlp.errors": float(k), "models.mlp.p95_ms": 5.0 + k}}
            for i in range(n) for k in (0, 30)])


async def test_anonymous_goes_to_login_and_bearer_works(api: Harness) -> None:
    async with _browser() as http:
        async with http.get(api.url + "/dashboard/devices?label=site%3Dnorth", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"].startswith("/dashboard/login?next=/dashboard/devices")
        async with http.get(api.url + "/dashboard/rollouts",
                            headers={"Authorization": f"Bearer {await api.token('viewer')}"}) as r:
            assert r.status == 200 and "No rollouts yet" in await r.text()
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        async with http.get(api.url + "/dashboard/devices", headers={"Authorization": "Bearer otk_nope"},
                            allow_redirects=False) as r:
            assert r.status == 302
        async with http.get(api.url + "/dashboard/static/vendor/uplot/LICENSE") as r:
            assert r.status == 200 and "MIT" in await r.text()


async def test_devices_table_pages_and_filters_server_side(api: Harness) -> None:
    await _seed(api, 120)
    async with _browser() as http:
        await _login(api, http, await api.token("viewer"))
        async with http.get(api.url + "/dashboard/devices?page=3") as r:
            html = await r.text()
        assert html.count("<tr>") == 1 + 20 and "cam-00100" in html and "cam-00099" not in html
        assert "Page 3 of 3" in html and "5 ms" in html and "0.00%" in html and "cuda" in html
        async with http.get(api.url + "/dashboard/devices?label=site%3Dnorth") as r:
            html = await r.text()
        assert "<small>60</small>" in html and "cam-00001" in html and "cam-00000" not in html
        assert 'href="/dashboard/devices?page=2&amp;label=site%3Dnorth"' in html
        async with http.get(api.url + "/dashboard/devices?label=nonsense") as r:
            assert r.status == 400 and "key=value" in await r.text()
        async with http.get(api.url + "/dashboard/devices/d00003") as r:
            html = await r.text()
            assert r.status == 200 and "cam-00003" in html and 'id="series"' in html and "uPlot" in html
        async with http.get(api.url + "/dashboard/devices/nope") as r:
            assert r.status == 404


async def test_csrf_viewer_rights_and_revoked_sessions(api: Harness, make_bundle: MakeBundle) -> None:
    assert (await api.push(make_bundle("mlp", name="demo", version="1.0.0"))).status == 201
    rid = (await api.call("POST", "/api/v1/rollouts", api.admin, json={
        "bundle": "demo@1.0.0", "stages": [{"devices": 1}, {"percent": 100}], "soak_s": 3600})).body["id"]
    operator = await api.token("operator")
    async with _browser() as http:
        # the login form itself needs its CSRF cookie and field
        async with http.post(api.url + "/dashboard/login", data={"token": operator}, allow_redirects=False) as r:
            assert r.status == 403
        await _login(api, http, operator)
        async with http.get(api.url + f"/dashboard/rollouts/{rid}") as r:
            html = await r.text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', html)
        assert csrf and 'class="pause"' in html
        for data in ({}, {"csrf": "forged"}):
            async with http.post(api.url + f"/dashboard/rollouts/{rid}/pause", data=data) as r:
                assert r.status == 403 and "CSRF" in await r.text()
        assert (await api.call("GET", f"/api/v1/rollouts/{rid}", api.admin)).body["status"] == "running"
        async with http.post(api.url + f"/dashboard/rollouts/{rid}/pause", data={"csrf": csrf.group(1)}) as r:
            assert r.status == 200 and 'id="status">paused<' in await r.text()
        # a revoked token's session ends at once
        token_id = next(t for t in (await _tokens(api)) if t[1] == "operator")[0]
        assert (await api.call("DELETE", f"/api/v1/tokens/{token_id}", api.admin)).status == 200
        async with http.get(api.url + "/dashboard/devices", allow_redirects=False) as r:
            assert r.status == 302
    async with _browser() as http:
        await _login(api, http, await api.token("viewer"))
        async with http.get(api.url + f"/dashboard/rollouts/{rid}") as r:
            html = await r.text()
        assert 'id="gates"' in html and 'id="actions"' not in html and "<button" in html  # only "Log out"
        csrf = re.search(r'name="csrf" value="([^"]+)"', html)
        assert csrf
        async with http.post(api.url + f"/dashboard/rollouts/{rid}/resume", data={"csrf": csrf.group(1)}) as r:
            assert r.status == 403
    # Bearer needs no CSRF (no ambient credential to abuse)
    r2 = await api.call("POST", f"/dashboard/rollouts/{rid}/resume", api.admin)
    assert r2.status == 200 and 'id="status">running<' in r2.raw.decode()
    assert (await api.call("GET", f"/api/v1/rollouts/{rid}", api.admin)).body["status"] == "running"


async def _tokens(api: Harness) -> list[tuple[str, str]]:
    from sqlalchemy import select

    from fleet.db import OperatorToken
    async with api.fleet.db.read() as s:
        return [(i, r) for i, r in (await s.execute(select(OperatorToken.id, OperatorToken.role))).all()]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_catalog_shows_owner_slo_versions_and_rollback_artifact(api: Harness,
                                                                     make_bundle: MakeBundle) -> None:
    for v in ("1.0.0", "2.0.0"):
        d = make_bundle("mlp", name="detector", version=v, owner="vision", description="finds defects",
                        slo_p95_ms=25.0, metrics=({"name": "defects_found", "min": 0.1},))
        assert (await api.push(d)).status == 201
    device, cred = await api.enroll("cam")
    await api.call("PUT", f"/api/v1/devices/{device}/assignment", api.admin, json={"bundles": ["detector@1.0.0"]})
    await api.call("POST", f"/api/v1/devices/{device}/reports", cred,
                   json={"bundles": [{"ref": "detector@1.0.0", "active": True}]})
    r = await api.call("POST", "/api/v1/rollouts", api.admin, json={
        "bundle": "detector@2.0.0", "stages": [{"percent": 100}], "soak_s": 3600})
    assert r.status == 201
    for _ in range(100):
        if (await api.call("GET", f"/api/v1/rollouts/{r.body['id']}", api.admin)).body["devices"] == 1:
            break
        await asyncio.sleep(0.1)
    async with _browser() as http:
        await _login(api, http, api.admin)
        async with http.get(api.url + "/dashboard/catalog") as resp:
            html = await resp.text()
    row = html[html.index("detector"):]
    assert "vision" in row and "finds defects" in row and "p95 ≤ 25 ms" in row and "defects_found ≥ 0.1" in row
    assert "detector@1.0.0: 1" in row and "rollout in progress" in row
    assert re.search(r"<td>detector@1\.0\.0</td></tr>", row)  # rollback artifact: what the devices ran before
