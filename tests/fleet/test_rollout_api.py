"""Rollouts over the HTTP API on SQLite and PostgreSQL: validation, rights, custom-metric and engine gates,
MQTT nudges, and the fleet serving HTTPS itself."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import pathlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from fleet.api import FLEET
from fleet.auth import create_operator_token
from fleet.config import RolloutConfig
from fleet.server import Running, start
from tests.agent.mqtt_broker import MosquittoBroker
from tests.conftest import MakeBundle

from .conftest import Harness, server_config
from .sim import FleetLink, SimDevice, Simulation, enroll_fleet

FAST = RolloutConfig(eval_interval_s=0.2)


async def _push(api: Harness, make_bundle: MakeBundle, version: str, **opts: Any) -> list[str]:
    r = await api.push(make_bundle("mlp", name="demo", version=version, slo_p95_ms=20.0, **opts))
    assert r.status == 201, r.body
    return list(r.body["models"])


async def test_create_validation_rights_and_conflicts(api: Harness, make_bundle: MakeBundle) -> None:
    await _push(api, make_bundle, "1.0.0")
    viewer, operator = await api.token("viewer"), await api.token("operator")
    body = {"bundle": "demo@1.0.0", "stages": [{"devices": 1}, {"percent": 100}]}
    assert (await api.call("POST", "/api/v1/rollouts", viewer, json=body)).status == 403
    assert (await api.call("POST", "/api/v1/rollouts", None, json=body)).status == 401
    for bad in ({"bundle": "demo"}, {**body, "stages": [{"percent": 101}]}, {**body, "surprise": 1},
                {**body, "stages": [{"percent": 50}]}, {**body, "gates": {"metrics": {"x": {"max": 1}}}}):
        r = await api.call("POST", "/api/v1/rollouts", operator, json=bad)
        assert r.status == 400 and isinstance(r.body["error"], str), (bad, r.status, r.body)
    assert (await api.call("POST", "/api/v1/rollouts", operator, json={"bundle": "demo@9.9.9"})).status == 404
    r = await api.call("POST", "/api/v1/rollouts", operator, json=body)
    assert r.status == 201 and r.body["status"] == "running" and r.body["gates"]["p95_ms"] == 20.0
    rid = r.body["id"]
    again = await api.call("POST", "/api/v1/rollouts", operator, json=body)
    assert again.status == 409 and rid in again.body["error"]
    assert (await api.call("POST", f"/api/v1/rollouts/{rid}/explode", operator)).status == 400
    assert (await api.call("POST", f"/api/v1/rollouts/{rid}/pause", viewer)).status == 403
    assert (await api.call("POST", f"/api/v1/rollouts/{rid}/abort", operator)).body["status"] == "aborted"
    assert (await api.call("POST", f"/api/v1/rollouts/{rid}/resume", operator)).status == 409
    listed = (await api.call("GET", "/api/v1/rollouts?status=aborted", viewer)).body["rollouts"]
    assert [x["id"] for x in listed] == [rid]
    shown = (await api.call("GET", f"/api/v1/rollouts/{rid}", viewer)).body
    assert [(e["kind"], e["actor"]) for e in shown["events"]][:1] == [("created", r.body["created_by"])]
    assert any(e["kind"] == "aborted" for e in shown["events"])
    await api.call("POST", "/api/v1/bundles/demo/1.0.0/revoke", api.admin, json={"reason": "bad"})
    assert (await api.call("POST", "/api/v1/rollouts", operator, json=body)).status == 409


async def _sim(api: Harness, models: list[str], count: int, **device: Any) -> tuple[list[SimDevice], Simulation]:
    link = FleetLink(api.http, api.url)
    devices = await enroll_fleet(link, api.admin, {"x86-t4": count}, {"demo": models},
                                 lambda ref, hw: (8.0, 0.0, 0.0), 0.3)
    for d in devices:
        for k, v in device.items():
            setattr(d, k, v)
        await api.call("PUT", f"/api/v1/devices/{d.device_id}/assignment", api.admin, json={"bundles": ["demo@1.0.0"]})
    sim = Simulation(devices)
    sim.start()
    return devices, sim


async def _final(api: Harness, rid: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = (await api.call("GET", f"/api/v1/rollouts/{rid}", api.admin)).body
        if body["status"] not in ("running", "paused"):
            return dict(body)
        await asyncio.sleep(0.1)
    raise AssertionError(body["reason"])


@pytest.fixture
async def fast_api(db_url: str, tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path]
                   ) -> AsyncIterator[Callable[..., Any]]:
    """Start a fleet with fast rollout evaluation (and whatever else a test overrides)."""
    started: list[Running] = []

    async def make(**overrides: Any) -> Harness:
        running = await start(server_config(tmp_path / "data", db_url, keypair[1], enroll_attempts_per_minute=1000,
                                            **{"rollouts": FAST, **overrides}))
        started.append(running)
        admin = (await create_operator_token(running.runner.app[FLEET].db, "admin", "t"))[1]
        work = tmp_path / "work"
        work.mkdir(exist_ok=True)
        return Harness(running.url, running, http, admin, work)

    async with aiohttp.ClientSession() as http:
        yield make
    for r in started:
        await r.stop()


@pytest.mark.parametrize("case", ["custom_metric", "engine_fallback"])
async def test_declared_metric_and_engine_fallback_gates_roll_back(fast_api: Callable[..., Any],
                                                                    make_bundle: MakeBundle, case: str) -> None:
    api = await fast_api()
    models = await _push(api, make_bundle, "1.0.0")
    await _push(api, make_bundle, "2.0.0", metrics=({"name": "defects_found", "min": 0.5},))
    if case == "custom_metric":
        device = {"custom": lambda ref, hw: {"defects_found": 0.2 if ref == "demo@2.0.0" else 0.9}}
        gates: dict[str, Any] = {"failure_limit": 0}
    else:
        device = {"engine": "cpu", "custom": lambda ref, hw: {"defects_found": 0.9}}
        gates = {"failure_limit": 0, "allowed_engines": ["tensorrt", "cuda"]}
    devices, sim = await _sim(api, models, 4, **device)
    try:
        r = await api.call("POST", "/api/v1/rollouts", api.admin, json={
            "bundle": "demo@2.0.0", "stages": [{"devices": 1}, {"percent": 100}], "soak_s": 0.2,
            "min_requests": 50, "gates": gates})
        final = await _final(api, r.body["id"])
        assert final["status"] == "rolled_back" and final["devices"] == 1
        halted = next(e for e in final["events"] if e["kind"] == "halted")
        failing = {x["gate"] for x in halted["detail"]["results"] if x["verdict"] == "fail"}
        assert failing == ({"metric:defects_found>="} if case == "custom_metric" else {"engine"})
        for _ in range(50):
            if all(d.active == ["demo@1.0.0"] for d in devices):
                break
            await asyncio.sleep(0.1)
        assert all(d.active == ["demo@1.0.0"] for d in devices)
        assert sum("demo@2.0.0" in h for d in devices for h in d.history) == 1
    finally:
        await sim.stop()


async def test_devices_are_nudged_over_mqtt(fast_api: Callable[..., Any], make_bundle: MakeBundle,
                                            tmp_path: pathlib.Path) -> None:
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    try:
        api = await fast_api(rollouts=RolloutConfig(eval_interval_s=0.2, nudge_mqtt_url=broker.url))
        models = await _push(api, make_bundle, "1.0.0")
        await _push(api, make_bundle, "2.0.0")
        got: list[tuple[str, dict[str, Any]]] = []
        sub = mqtt.Client(CallbackAPIVersion.VERSION2)
        subscribed = asyncio.Event()
        loop = asyncio.get_running_loop()
        sub.on_message = lambda c, u, m: got.append((m.topic, json.loads(m.payload)))
        sub.on_subscribe = lambda *a: loop.call_soon_threadsafe(subscribed.set)
        sub.on_connect = lambda c, *a: c.subscribe("outpost/devices/+/nudge", qos=1)
        sub.connect("127.0.0.1", broker.port)
        sub.loop_start()
        try:
            await asyncio.wait_for(subscribed.wait(), 10)
            devices, sim = await _sim(api, models, 3)
            try:
                r = await api.call("POST", "/api/v1/rollouts", api.admin, json={
                    "bundle": "demo@2.0.0", "stages": [{"devices": 1}, {"percent": 100}], "soak_s": 30})
                # the nudge and the canary's next poll race each other: wait for both
                deadline = time.monotonic() + 20
                canaries: list[SimDevice] = []
                while time.monotonic() < deadline and not (got and canaries):
                    await asyncio.sleep(0.1)
                    canaries = [d for d in devices if d.history and d.history[-1] == ["demo@2.0.0"]]
                rd = (await api.call("GET", f"/api/v1/rollouts/{r.body['id']}", api.admin)).body
                assert rd["devices"] == 1
                assert len(canaries) == 1, [d.history for d in devices]
                (canary,) = canaries
                assert got == [(f"outpost/devices/{canary.device_id}/nudge", {"serial": canary.serial})]
            finally:
                await sim.stop()
        finally:
            sub.loop_stop()
            sub.disconnect()
    finally:
        broker.stop()


def _self_signed(tmp: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "fleet.crt", tmp / "fleet.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_fleet_serves_tls_and_the_session_cookie_is_secure(fast_api: Callable[..., Any],
                                                                 tmp_path: pathlib.Path) -> None:
    cert, key = _self_signed(tmp_path)
    api = await fast_api(tls_cert=cert, tls_key=key)
    assert api.url.startswith("https://")
    trusted = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # unsafe: an IP host
        async with http.get(api.url + "/api/v1/health", ssl=trusted) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with http.get(api.url + "/api/v1/health", ssl=ssl.create_default_context()):
                pass
        async with http.get(api.url + "/dashboard/login", ssl=trusted) as r:
            csrf = r.cookies["outpost_login_csrf"]
            assert csrf["secure"] and csrf["httponly"]
        async with http.post(api.url + "/dashboard/login", ssl=trusted, allow_redirects=False,
                             data={"token": api.admin, "csrf": csrf.value}) as r:
            assert r.status == 302
            session = r.cookies["outpost_session"]
            assert session["secure"] and session["httponly"] and session["samesite"] == "Strict"
    plain = api.url.replace("https://", "http://")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(plain + "/api/v1/health") as r:
                await r.read()
