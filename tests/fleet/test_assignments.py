"""Signed assignment documents and long-poll."""

from __future__ import annotations

import asyncio
import base64
import json
import time

from fleet import canonical_bytes, verify_signature
from tests.conftest import MakeBundle

from .conftest import Harness


async def _setup(api: Harness, make_bundle: MakeBundle) -> tuple[str, str]:
    for name, version in (("demo", "1.0.0"), ("demo", "2.0.0"), ("other", "1.0.0")):
        assert (await api.push(make_bundle("mlp", name=name, version=version))).status == 201
    return await api.enroll("d1")


async def test_document_is_signed_and_binds_device_serial_expiry(api: Harness, make_bundle: MakeBundle) -> None:
    device, cred = await _setup(api, make_bundle)
    r = await api.call("PUT", f"/api/v1/devices/{device}/assignment", api.admin,
                       json={"bundles": ["demo@1.0.0", "other@1.0.0"]})
    assert r.status == 200 and r.body["serial"] == 1
    key = (await api.call("GET", "/api/v1/keys/assignment", cred)).body
    assert key["algorithm"] == "ecdsa-p256-sha256"
    signed = (await api.call("GET", f"/api/v1/devices/{device}/assignment", cred)).body
    payload = base64.b64decode(signed["payload"])
    assert verify_signature(key["public_key_pem"].encode(), payload, signed["signature"])
    doc = json.loads(payload)
    assert payload == canonical_bytes(doc) and doc == signed["document"]
    assert doc["device_id"] == device and doc["serial"] == 1 and signed["key_id"] == key["key_id"]
    assert doc["expires_at"] > time.time() > doc["issued_at"] - 5
    assert [b["ref"] for b in doc["bundles"]] == ["demo@1.0.0", "other@1.0.0"]
    assert all(len(b["digest"]) == 64 and b["url"].endswith("/archive") for b in doc["bundles"])
    # any change to the payload breaks the signature (a device refuses it)
    forged = canonical_bytes({**doc, "device_id": "someone-else"})
    assert not verify_signature(key["public_key_pem"].encode(), forged, signed["signature"])


async def test_serial_grows_only_on_change(api: Harness, make_bundle: MakeBundle) -> None:
    device, _ = await _setup(api, make_bundle)
    path = f"/api/v1/devices/{device}/assignment"
    serials = []
    for refs in (["demo@1.0.0"], ["demo@1.0.0"], ["demo@2.0.0"], [], []):
        r = await api.call("PUT", path, api.admin, json={"bundles": refs})
        assert r.status == 200, r.body
        serials.append(r.body["serial"])
    assert serials == [1, 1, 2, 3, 3]


async def test_bad_assignments_are_refused(api: Harness, make_bundle: MakeBundle) -> None:
    device, _ = await _setup(api, make_bundle)
    path = f"/api/v1/devices/{device}/assignment"
    assert (await api.call("PUT", path, api.admin, json={"bundles": ["nope@1"]})).status == 404
    assert (await api.call("PUT", path, api.admin, json={"bundles": ["demo@1.0.0", "demo@2.0.0"]})).status == 400
    assert (await api.call("PUT", path, api.admin, json={"bundles": ["no-version"]})).status == 400
    assert (await api.call("PUT", "/api/v1/devices/ghost/assignment", api.admin,
                           json={"bundles": ["demo@1.0.0"]})).status == 404
    assert (await api.call("GET", path, api.admin)).body["document"]["serial"] == 0


async def test_long_poll_answers_on_change(api: Harness, make_bundle: MakeBundle) -> None:
    device, cred = await _setup(api, make_bundle)
    path = f"/api/v1/devices/{device}/assignment"
    poll = asyncio.create_task(api.call("GET", f"{path}?serial=0&wait_s=30", cred))
    await asyncio.sleep(0.2)
    assert not poll.done()
    await api.call("PUT", path, api.admin, json={"bundles": ["demo@1.0.0"]})
    r = await asyncio.wait_for(poll, 10)
    assert r.status == 200 and r.body["document"]["serial"] == 1
    assert [b["ref"] for b in r.body["document"]["bundles"]] == ["demo@1.0.0"]


async def test_long_poll_times_out_with_the_same_serial_and_stale_serial_answers_at_once(
        api: Harness, make_bundle: MakeBundle) -> None:
    device, cred = await _setup(api, make_bundle)
    path = f"/api/v1/devices/{device}/assignment"
    r = await api.call("GET", f"{path}?serial=0&wait_s=0.2", cred)
    assert r.status == 200 and r.body["document"]["serial"] == 0
    await api.call("PUT", path, api.admin, json={"bundles": ["demo@1.0.0"]})
    r = await asyncio.wait_for(api.call("GET", f"{path}?serial=0&wait_s=60", cred), 10)
    assert r.body["document"]["serial"] == 1
    assert (await api.call("GET", f"{path}?serial=-1", cred)).status == 400
    assert (await api.call("GET", f"{path}?serial=0&wait_s=999", cred)).status == 400


async def test_long_poll_sees_changes_written_by_another_process(api: Harness, make_bundle: MakeBundle) -> None:
    """A change made straight in the database (as another fleet process would) wakes the poll."""
    device, cred = await _setup(api, make_bundle)
    from sqlalchemy import update

    from fleet.db import Device
    path = f"/api/v1/devices/{device}/assignment"
    poll = asyncio.create_task(api.call("GET", f"{path}?serial=0&wait_s=30", cred))
    await asyncio.sleep(0.3)
    async with api.fleet.db.transaction() as s:
        await s.execute(update(Device).where(Device.id == device)
                        .values(assignment_serial=5, assignment_changed_at=time.time()))
    r = await asyncio.wait_for(poll, 10)
    assert r.body["document"]["serial"] == 5
