"""Enrollment, device credentials, labels and removal."""

from __future__ import annotations

import asyncio

from .conftest import Harness


async def test_enrollment_token_uses_are_limited(api: Harness) -> None:
    r = await api.call("POST", "/api/v1/enroll-tokens", api.admin, json={"uses": 2, "labels": {"site": "lab"}})
    assert r.status == 201 and r.body["token"].startswith("enr_")
    token = r.body["token"]
    ids = set()
    for name in ("a", "b"):
        e = await api.call("POST", "/api/v1/enroll", token, json={"name": name, "labels": {"role": "cam"}})
        assert e.status == 201 and e.body["credential"].startswith("dev_")
        assert e.body["labels"] == {"site": "lab", "role": "cam"}
        ids.add(e.body["device_id"])
    assert len(ids) == 2
    spent = await api.call("POST", "/api/v1/enroll", token, json={"name": "c"})
    assert spent.status == 401 and "used up" in spent.body["error"]
    assert spent.headers["WWW-Authenticate"].startswith("Bearer")


async def test_concurrent_enrollments_never_overspend_a_token(api: Harness) -> None:
    r = await api.call("POST", "/api/v1/enroll-tokens", api.admin, json={"uses": 3})
    results = await asyncio.gather(*(api.call("POST", "/api/v1/enroll", r.body["token"], json={"name": f"d{i}"})
                                     for i in range(8)))
    assert sorted(x.status for x in results) == [201] * 3 + [401] * 5


async def test_expired_enrollment_token_is_refused(api: Harness) -> None:
    r = await api.call("POST", "/api/v1/enroll-tokens", api.admin, json={"uses": 5, "ttl_s": 0.01})
    await asyncio.sleep(0.05)
    assert (await api.call("POST", "/api/v1/enroll", r.body["token"], json={})).status == 401


async def test_enrollment_needs_an_enrollment_token(api: Harness) -> None:
    assert (await api.call("POST", "/api/v1/enroll", None, json={})).status == 401
    assert (await api.call("POST", "/api/v1/enroll", api.admin, json={})).status == 401
    assert (await api.call("POST", "/api/v1/enroll", "enr_forged", json={})).status == 401


async def test_enrollment_is_rate_limited(api: Harness) -> None:
    limit = api.fleet.config.enroll_attempts_per_minute
    statuses = [(await api.call("POST", "/api/v1/enroll", "enr_guess", json={})).status for _ in range(limit + 2)]
    assert statuses[:limit] == [401] * limit
    assert statuses[limit] == 429
    r = await api.call("POST", "/api/v1/enroll", "enr_guess", json={})
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1


async def test_list_filter_labels_show_delete(api: Harness) -> None:
    a, _ = await api.enroll("a", {"site": "north", "tier": "gpu"})
    b, cred_b = await api.enroll("b", {"site": "south"})
    listed = await api.call("GET", "/api/v1/devices", api.admin)
    assert {d["id"] for d in listed.body["devices"]} == {a, b}
    north = await api.call("GET", "/api/v1/devices?label=site=north", api.admin)
    assert [d["id"] for d in north.body["devices"]] == [a]
    both = await api.call("GET", "/api/v1/devices?label=site=north&label=tier=cpu", api.admin)
    assert both.body["devices"] == []
    assert (await api.call("GET", "/api/v1/devices?label=nonsense", api.admin)).status == 400
    r = await api.call("PUT", f"/api/v1/devices/{b}/labels", api.admin, json={"labels": {"site": "north"}})
    assert r.status == 200 and r.body["labels"] == {"site": "north"}
    north = await api.call("GET", "/api/v1/devices?label=site=north", api.admin)
    assert {d["id"] for d in north.body["devices"]} == {a, b}
    shown = await api.call("GET", f"/api/v1/devices/{b}", cred_b)
    assert shown.status == 200 and shown.body["name"] == "b"
    assert (await api.call("DELETE", f"/api/v1/devices/{b}", api.admin)).status == 200
    assert (await api.call("GET", f"/api/v1/devices/{b}", api.admin)).status == 404
    # the deleted device's credential is dead everywhere
    assert (await api.call("GET", f"/api/v1/devices/{b}/assignment", cred_b)).status == 401
    assert (await api.call("DELETE", f"/api/v1/devices/{b}", api.admin)).status == 404


async def test_operator_token_created_by_admin_works_and_tokens_are_stored_hashed(api: Harness) -> None:
    r = await api.call("POST", "/api/v1/tokens", api.admin, json={"role": "viewer", "name": "dash"})
    assert r.status == 201 and r.body["token"].startswith("otk_")
    assert (await api.call("GET", "/api/v1/devices", r.body["token"])).status == 200
    assert (await api.call("POST", "/api/v1/tokens", api.admin, json={"role": "root"})).status == 400
    # no secret appears anywhere in the database file's tables
    from sqlalchemy import select

    from fleet.db import OperatorToken
    async with api.fleet.db.transaction() as s:
        hashes = list((await s.execute(select(OperatorToken.token_hash))).scalars())
    assert r.body["token"] not in hashes and api.admin not in hashes and len(hashes) == 2


async def test_text_postgresql_cannot_store_is_a_400_on_every_backend(api: Harness) -> None:
    """Found by the fuzz suite: NUL characters and lone surrogates once made PostgreSQL answer 500."""
    nul = await api.call("POST", "/api/v1/tokens", api.admin, data=b'{"role": "viewer", "name": "a\\u0000b"}',
                         headers={"Content-Type": "application/json"})
    assert nul.status == 400
    surrogate = await api.call("PUT", "/api/v1/devices/x/assignment", api.admin,
                               data=b'{"bundles": ["a\\ud800@1.0.0"]}', headers={"Content-Type": "application/json"})
    assert surrogate.status == 400
    assert (await api.call("GET", "/api/v1/devices/a%00b", api.admin)).status == 400
    assert (await api.call("GET", "/api/v1/bundles?name=a%00", api.admin)).status == 400
