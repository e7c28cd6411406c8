"""Authorization matrix: every principal against every endpoint, and device A against device B.

Allowed means "not 401/403" (the endpoint may still say 404 or 409 for its
own reasons); refused means exactly 401 for no or bad credentials and 403 for a
known principal without the right.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tests.conftest import MakeBundle

from .conftest import CHANGE_POLL_S, Harness

ROLES = ("viewer", "operator", "admin")
ALL = ("none", "bad", "viewer", "operator", "admin", "device_a", "device_b")


@dataclass
class Case:
    method: str
    path: str                       # {A} is device A's id
    allowed: frozenset[str]
    body: Any = None
    raw: Callable[[], Awaitable[bytes]] | None = None


def _from(role: str) -> set[str]:
    return set(ROLES[ROLES.index(role):])


async def test_authorization_matrix(api: Harness, make_bundle: MakeBundle) -> None:
    archive = api.pack(make_bundle("mlp", name="demo", version="1.0.0")).read_bytes()
    await api.call("POST", "/api/v1/bundles", api.admin, data=archive)
    await api.push(make_bundle("mlp", name="demo", version="2.0.0"))
    a, cred_a = await api.enroll("a")
    b, cred_b = await api.enroll("b")
    await api.call("PUT", f"/api/v1/devices/{a}/assignment", api.admin, json={"bundles": ["demo@1.0.0"]})
    # device_a acts on A (itself); device_b acts on A (someone else's device)
    creds: dict[str, str | None] = {"none": None, "bad": "otk_not-a-real-token", "device_a": cred_a,
                                    "device_b": cred_b}
    for role in ROLES:
        creds[role] = await api.token(role)
    report = {"health": {"status": "ok"}}

    async def disposable() -> str:
        return (await api.enroll("victim"))[0]

    cases = [
        Case("GET", "/api/v1/health", frozenset(ALL)),
        Case("GET", "/api/v1/openapi.json", frozenset(ALL)),
        Case("GET", "/api/v1/keys/assignment", frozenset({*ROLES, "device_a", "device_b"})),
        Case("POST", "/api/v1/tokens", frozenset({"admin"}), {"role": "viewer"}),
        Case("POST", "/api/v1/enroll-tokens", frozenset(_from("operator")), {"uses": 1}),
        Case("GET", "/api/v1/devices", frozenset(ROLES)),
        Case("GET", "/api/v1/devices/{A}", frozenset({*ROLES, "device_a"})),
        Case("PUT", "/api/v1/devices/{A}/labels", frozenset(_from("operator")), {"labels": {"k": "v"}}),
        Case("GET", "/api/v1/devices/{A}/assignment", frozenset({*ROLES, "device_a"})),
        Case("PUT", "/api/v1/devices/{A}/assignment", frozenset(_from("operator")), {"bundles": ["demo@1.0.0"]}),
        Case("POST", "/api/v1/devices/{A}/reports", frozenset({"device_a"}), report),
        Case("GET", "/api/v1/devices/{A}/telemetry", frozenset({*ROLES, "device_a"})),
        Case("GET", "/api/v1/bundles", frozenset(ROLES)),
        Case("POST", "/api/v1/bundles", frozenset(_from("operator")), raw=lambda: _async(archive)),
        Case("GET", "/api/v1/bundles/demo/1.0.0", frozenset(ROLES)),
        # device A is assigned demo@1.0.0; device B is not
        Case("GET", "/api/v1/bundles/demo/1.0.0/archive", frozenset({*ROLES, "device_a"})),
        Case("POST", "/api/v1/bundles/demo/2.0.0/revoke", frozenset(_from("operator")), {}),
        Case("DELETE", "/api/v1/devices/{VICTIM}", frozenset(_from("operator"))),
        Case("DELETE", "/api/v1/tokens/{TOKEN}", frozenset({"admin"})),
    ]
    wrong: list[str] = []
    for case in cases:
        for who in ALL:
            path = case.path.replace("{A}", a)
            if "{VICTIM}" in path:
                path = path.replace("{VICTIM}", await disposable())
            if "{TOKEN}" in path:
                fresh = await api.call("POST", "/api/v1/tokens", api.admin, json={"role": "viewer"})
                path = path.replace("{TOKEN}", fresh.body["id"])
            data = await case.raw() if case.raw else None
            r = await api.call(case.method, path, creds[who], json=case.body, data=data)
            if who in case.allowed:
                ok = r.status not in (401, 403) and r.status < 500
            else:
                ok = r.status == (401 if who in ("none", "bad") else 403)
            if not ok:
                wrong.append(f"{who:9} {case.method} {case.path}: {r.status} {r.body}")
            assert r.status < 500
    assert not wrong, "\n".join(wrong)
    # device B may read itself (proving the refusals above are about A, not B's credential)
    assert (await api.call("GET", f"/api/v1/devices/{b}/assignment", cred_b)).status == 200
    assert (await api.call("POST", f"/api/v1/devices/{b}/reports", cred_b, json=report)).status == 202


async def _async(value: bytes) -> bytes:
    return value


async def test_revoked_token_is_401_at_once_here_and_soon_in_other_processes(api: Harness) -> None:
    from sqlalchemy import select, update

    from fleet.auth import hash_secret
    from fleet.db import OperatorToken, Revocation
    r = await api.call("POST", "/api/v1/tokens", api.admin, json={"role": "operator"})
    token, token_id = r.body["token"], r.body["id"]
    assert (await api.call("GET", "/api/v1/devices", token)).status == 200  # now cached as valid
    assert (await api.call("DELETE", f"/api/v1/tokens/{token_id}", api.admin)).status == 200
    assert (await api.call("GET", "/api/v1/devices", token)).status == 401
    assert (await api.call("DELETE", f"/api/v1/tokens/{token_id}", api.admin)).status == 404

    # another process revokes (rows written straight to the database): this one learns within a period
    other = await api.token("viewer")
    assert (await api.call("GET", "/api/v1/devices", other)).status == 200
    async with api.fleet.db.transaction() as s:
        await s.execute(update(OperatorToken).where(OperatorToken.token_hash == hash_secret(other))
                        .values(revoked_at=1.0))
        s.add(Revocation(kind="token", subject=hash_secret(other), at=time.time()))
    await asyncio.sleep(CHANGE_POLL_S * 4)
    assert (await api.call("GET", "/api/v1/devices", other)).status == 401
    async with api.fleet.db.read() as s:
        assert (await s.execute(select(Revocation.kind))).scalars().all() == ["token", "token"]

    r = await api.call("GET", "/api/v1/devices", headers={"Authorization": "Basic abc"})
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_device_deleted_by_another_process_loses_access_within_a_period(api: Harness) -> None:
    from sqlalchemy import delete

    from fleet.db import Device, Revocation
    device, cred = await api.enroll("gone")
    assert (await api.call("GET", f"/api/v1/devices/{device}/assignment", cred)).status == 200
    async with api.fleet.db.transaction() as s:
        await s.execute(delete(Device).where(Device.id == device))
        s.add(Revocation(kind="device", subject=device, at=time.time()))
    await asyncio.sleep(CHANGE_POLL_S * 4)
    assert (await api.call("GET", f"/api/v1/devices/{device}/assignment", cred)).status == 401
