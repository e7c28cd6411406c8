"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright; no browser download).

Logs in, reads the devices table of a simulated fleet, opens a running
rollout's gates, pauses it from the page, checks a viewer gets no buttons and
that a form posted without the CSRF token is refused. Screenshots of every
page go to OUTPOST_TEST_ARTIFACTS (default: the test's temporary directory).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, async_playwright

import bundle
from fleet.api import FLEET
from fleet.auth import create_operator_token
from fleet.config import RolloutConfig
from fleet.server import start
from tests.conftest import MakeBundle

from .conftest import server_config
from .sim import FleetLink, Simulation, enroll_fleet

CHROMIUM = os.environ.get("OUTPOST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"{CHROMIUM} not found: install Debian's chromium (scripts/setup.sh does)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def artifacts(tmp_path: pathlib.Path) -> pathlib.Path:
    out = pathlib.Path(os.environ.get("OUTPOST_TEST_ARTIFACTS") or tmp_path / "artifacts") / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
async def fleet_with_rollout(db_url: str, tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path],
                             make_bundle: MakeBundle) -> AsyncIterator[dict[str, Any]]:
    config = server_config(tmp_path / "data", db_url, keypair[1], enroll_attempts_per_minute=1000,
                           rollouts=RolloutConfig(eval_interval_s=0.3))
    running = await start(config)
    try:
        async with aiohttp.ClientSession() as http:
            db = running.runner.app[FLEET].db
            admin = (await create_operator_token(db, "admin", "browser"))[1]
            operator = (await create_operator_token(db, "operator", "alice"))[1]
            viewer = (await create_operator_token(db, "viewer", "bob"))[1]
            link = FleetLink(http, running.url)
            models: dict[str, list[str]] = {}
            for v in ("1.0.0", "2.0.0"):
                d = make_bundle("mlp", name="demo", version=v, slo_p95_ms=20.0, owner="vision-team",
                                description="Defect detector for line 3")
                data = bundle.pack(d, tmp_path / f"{v}.tar.gz").read_bytes()
                async with http.post(running.url + "/api/v1/bundles", data=data,
                                     headers={"Authorization": f"Bearer {admin}"}) as r:
                    assert r.status == 201
                    models["demo"] = (await r.json())["models"]
            devices = await enroll_fleet(link, admin, {"x86-t4": 12, "jetson-orin": 8}, models,
                                         lambda ref, hw: (8.0, 0.0, 0.0), 0.5)
            for d in devices:
                await link._json("PUT", f"/api/v1/devices/{d.device_id}/assignment", admin,
                                 {"bundles": ["demo@1.0.0"]})
            sim = Simulation(devices)
            sim.start()
            status, r = await link._json("POST", "/api/v1/rollouts", admin, {
                "bundle": "demo@2.0.0", "selector": {"labels": {"fleet": "sim"}},
                "stages": [{"devices": 2}, {"percent": 100}], "soak_s": 3600, "min_requests": 50})
            assert status == 201, r
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # wait until the gates have figures to show
                _, shown = await link._json("GET", f"/api/v1/rollouts/{r['id']}", admin)
                if shown["reason"].startswith("soaking"):
                    break
                await asyncio.sleep(0.2)
            assert shown["reason"].startswith("soaking"), shown["reason"]
            yield {"url": running.url, "operator": operator, "viewer": viewer, "rollout": r["id"], "link": link,
                   "admin": admin}
            await sim.stop()
    finally:
        await running.stop()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_dashboard_in_chromium(fleet_with_rollout: dict[str, Any], browser: Browser,
                                     artifacts: pathlib.Path) -> None:
    f = fleet_with_rollout
    url, rollout = f["url"], f["rollout"]
    ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await ctx.new_page()

    # anonymous -> login page
    await page.goto(f"{url}/dashboard/devices")
    assert "/dashboard/login" in page.url
    await page.screenshot(path=str(artifacts / "login.png"))
    await page.fill("input[name=token]", "otk_wrong")
    await page.click("button[type=submit]")
    assert "unknown or revoked" in await page.inner_text("#error")
    await page.fill("input[name=token]", f["operator"])
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{url}/dashboard/devices")
    cookie = next(c for c in await ctx.cookies() if c["name"] == "outpost_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and f["operator"] not in cookie["value"]

    # the devices table shows the simulated fleet
    rows = page.locator("#devices tbody tr")
    assert await rows.count() == 20
    assert "20" in await page.inner_text("h1")
    text = await page.inner_text("#devices")
    assert "jetson-orin-0" in text and "x86-t4-11" in text and "demo@" in text and "tensorrt" in text
    await page.screenshot(path=str(artifacts / "devices.png"), full_page=True)
    await page.fill("input[name=label]", "hardware=jetson-orin")
    await page.click("form.filter button")
    await page.wait_for_url(f"{url}/dashboard/devices?label=hardware%3Djetson-orin")
    assert await rows.count() == 8
    await page.screenshot(path=str(artifacts / "devices-filtered.png"), full_page=True)
    await page.click("#devices tbody tr:first-child a")
    await page.wait_for_selector("#latency-chart canvas")  # uPlot drew it
    await page.screenshot(path=str(artifacts / "device.png"), full_page=True)

    # the rollout page shows its gates, value against threshold
    await page.goto(f"{url}/dashboard/rollouts/{rollout}")
    gates = await page.inner_text("#gates")
    assert "p95_ms" in gates and "error_rate" in gates and "20" in gates and "pass" in gates
    assert await page.inner_text("#status") == "running"
    await page.screenshot(path=str(artifacts / "rollout.png"), full_page=True)

    # a form posted without the CSRF token is refused (the browser sends the session cookie)
    refused = await page.request.post(f"{url}/dashboard/rollouts/{rollout}/pause", form={"do": "pause"},
                                      max_redirects=0)
    assert refused.status == 403 and "CSRF" in await refused.text()
    assert (await (await page.request.get(f"{url}/api/v1/rollouts/{rollout}", headers={
        "Authorization": f"Bearer {f['operator']}"})).json())["status"] == "running"

    # pausing from the page changes its state
    await page.click("#actions button.pause")
    await page.wait_for_url(f"{url}/dashboard/rollouts/{rollout}")
    assert await page.inner_text("#status") == "paused"
    assert "paused by an operator" in await page.inner_text("#events")
    assert await page.locator("#actions button.resume").count() == 1
    await page.screenshot(path=str(artifacts / "rollout-paused.png"), full_page=True)

    await page.goto(f"{url}/dashboard/catalog")
    catalog = await page.inner_text("#catalog")
    assert "vision-team" in catalog and "Defect detector" in catalog and "demo@1.0.0" in catalog
    await page.screenshot(path=str(artifacts / "catalog.png"), full_page=True)
    await ctx.close()

    # a viewer sees the rollout but no buttons, and cannot act even by posting the form
    ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await ctx.new_page()
    await page.goto(f"{url}/dashboard/login")
    await page.fill("input[name=token]", f["viewer"])
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{url}/dashboard/devices")
    await page.goto(f"{url}/dashboard/rollouts/{rollout}")
    assert await page.locator("#gates").count() == 1
    assert await page.locator("#actions").count() == 0 and await page.locator("button.resume").count() == 0
    await page.screenshot(path=str(artifacts / "rollout-viewer.png"), full_page=True)
    await ctx.close()
