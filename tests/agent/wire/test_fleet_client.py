"""The agent's fleet client against a real fleet server on loopback (default aiohttp transport)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agent.credentials import Credential
from agent.fleet_client import FleetClient, HttpRequest, HttpResponse
from agent.fleet_errors import AuthFailed, FleetRejected, FleetUnreachable
from contract import (
    AssignmentState,
    Event,
    Health,
    ModelState,
    ModelStats,
    TelemetryWindow,
    build_report,
    key_id,
    verify_assignment,
)
from tests.conftest import MakeBundle

from .conftest import LiveFleet

Device = tuple[FleetClient, Credential]


async def test_enroll_returns_a_credential_the_client_then_uses(live_fleet: LiveFleet, device: Device) -> None:
    client, cred = device
    assert cred.fleet_url == live_fleet.url and cred.device_id and cred.secret.startswith("dev_")
    assert dict(cred.labels) == {"site": "lab", "room": "3"}  # the token's labels merged with the device's
    assert client.device_id == cred.device_id
    assert cred.secret not in repr(cred) and cred.secret not in repr(client)
    shown = await live_fleet.call("GET", f"/api/v1/devices/{cred.device_id}")
    assert shown["name"] == "edge-1"


async def test_enroll_token_is_single_use(live_fleet: LiveFleet) -> None:
    token = await live_fleet.enroll_token(uses=1)
    async with FleetClient(live_fleet.url, "", "") as client:
        await client.enroll(token)
        with pytest.raises(AuthFailed) as caught:
            await client.enroll(token)
    assert caught.value.status == 401 and "used up" in caught.value.reason


async def test_signed_assignment_long_poll_and_verification(live_fleet: LiveFleet, device: Device,
                                                            make_bundle: MakeBundle) -> None:
    client, cred = device
    pem = await client.fleet_key()
    first = await client.poll_assignment(None, 0)
    assert first["key_id"] == key_id(pem)
    state = AssignmentState.initial(cred.device_id)
    a0 = verify_assignment(first, pem, state, time.time())
    assert a0.serial == 0 and a0.bundles == ()
    state = state.after(a0)

    await live_fleet.push(make_bundle("mlp", name="demo", version="1.0.0"))
    poll = asyncio.create_task(client.poll_assignment(a0.serial, 20))
    await asyncio.sleep(0.3)
    assert not poll.done()  # held by the fleet until something changes
    started = time.monotonic()
    await live_fleet.assign(cred.device_id, ["demo@1.0.0"])
    envelope = await asyncio.wait_for(poll, 10)
    assert time.monotonic() - started < 5
    a1 = verify_assignment(envelope, pem, state, time.time())
    assert a1.serial == 1 and [b.ref for b in a1.bundles] == ["demo@1.0.0"]

    quiet = time.monotonic()
    same = await client.poll_assignment(1, 0.5)
    assert 0.3 < time.monotonic() - quiet < 5
    assert verify_assignment(same, pem, state.after(a1), time.time()).serial == 1


async def test_reports_built_with_the_contract_are_accepted_and_stored(live_fleet: LiveFleet, device: Device) -> None:
    client, cred = device
    now = time.time()
    report = build_report(
        agent_version="0.1.0", time=now, hardware={"architecture": "x86_64", "cpu_count": 2},
        bundles=[{"ref": "demo@1.0.0", "active": True, "engine": "ort-cpu"}],
        models=[ModelState("demo", active="1.0.0", backend="ort-cpu", health=Health("ok"))],
        events=[Event(now, "install_refused", "preflight", "needs compute capability 8.7", ref="demo@2.0.0")],
        telemetry=[TelemetryWindow(now - 10, now, 5, 0, {"cpu_percent": 3.0},
                                   {"demo": ModelStats(5, 0, 0, 1.0, 2.0, 3.0)})])
    await client.send_reports([report, report])
    shown = await live_fleet.call("GET", f"/api/v1/devices/{cred.device_id}")
    assert shown["state"]["models"][0]["active"] == "1.0.0"
    assert shown["state"]["events"][0]["reason"] == "needs compute capability 8.7"
    series = await live_fleet.call("GET", f"/api/v1/devices/{cred.device_id}/telemetry?since={now - 60}")
    assert len(series["points"]) == 2 and series["points"][0]["metrics"]["models.demo.p99_ms"] == 3.0


async def test_errors_are_typed(live_fleet: LiveFleet, device: Device) -> None:
    client, cred = device
    with pytest.raises(FleetRejected) as bad:
        await client.send_report({"health": {"status": "splendid"}})
    assert bad.value.status == 400 and not isinstance(bad.value, AuthFailed) and "health" in bad.value.reason
    async with FleetClient(live_fleet.url, cred.device_id, "dev_wrong") as wrong:
        with pytest.raises(AuthFailed) as unknown:
            await wrong.poll_assignment(None, 0)
    assert unknown.value.status == 401
    other_token = await live_fleet.enroll_token()
    async with FleetClient(live_fleet.url, "", "") as other:
        await other.enroll(other_token)
        other.device_id = cred.device_id  # a device asking for another device's document
        with pytest.raises(AuthFailed) as foreign:
            await other.poll_assignment(None, 0)
    assert foreign.value.status == 403
    await live_fleet.stop()
    with pytest.raises(FleetUnreachable):
        await client.poll_assignment(None, 0)
    assert isinstance(FleetUnreachable("x"), ConnectionError)


async def test_redirects_are_not_followed_so_the_credential_stays_home(live_fleet: LiveFleet) -> None:
    """A 3xx is an answer, never a hop: following it would send the bearer credential elsewhere."""
    from aiohttp import web

    seen: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        raise web.HTTPFound("http://127.0.0.1:9/steal")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with FleetClient(f"http://127.0.0.1:{port}", "d", "dev_secret") as client:
            with pytest.raises(FleetRejected):
                await client.poll_assignment(None, 0)
    finally:
        await runner.cleanup()
    assert seen == ["Bearer dev_secret"]


class ScriptedFleet:
    """An in-memory transport: answers from a table, records what it was asked."""

    def __init__(self, answers: dict[str, tuple[int, bytes]]) -> None:
        self.answers = answers
        self.requests: list[HttpRequest] = []

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        status, body = self.answers[request.path]

        async def chunks() -> Any:
            yield body

        return HttpResponse(status, {"content-type": "application/json"}, chunks())


async def test_transport_seam_carries_auth_and_maps_statuses() -> None:
    fleet = ScriptedFleet({"/api/v1/keys/assignment": (200, b'{"public_key_pem": "PEM"}'),
                           "/api/v1/devices/d%2F1/assignment": (503, b'{"error": "database unreachable"}'),
                           "/api/v1/devices/d%2F1/reports": (200, b"[1]")})
    client = FleetClient("http://fleet.invalid", "d/1", "opd_s", fleet)
    assert await client.fleet_key() == b"PEM"
    assert fleet.requests[0].headers["Authorization"] == "Bearer opd_s"
    with pytest.raises(FleetRejected) as busy:
        await client.poll_assignment(None, 0)
    assert busy.value.retryable and busy.value.reason == "database unreachable"
    with pytest.raises(FleetRejected, match="not a JSON object"):
        await client.send_report({})
