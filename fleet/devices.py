"""The register of devices: enrollment, labels, listing, removal.

Enrollment trades an operator-made enrollment token (limited uses, expiring)
for a device id and the device's own credential. The use is consumed with a
conditional UPDATE (`uses_left > 0 AND not expired`), so two processes cannot
spend the last use twice. Deleting a device deletes its credential hash: the
next request with it is 401.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, select, update

from .auth import DEVICE_PREFIX, ENROLL_PREFIX, hash_secret, new_id, new_secret
from .db import AssignmentItem, Bundle, Database, Device, DeviceLabel, EnrollToken, Revocation
from .errors import InvalidRequest, NotFound, Unauthenticated

_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")


def check_labels(labels: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not _LABEL_KEY.match(k):
            raise InvalidRequest(f"bad label key {str(k)[:80]!r}")
        if not isinstance(v, str) or len(v) > 200:
            raise InvalidRequest(f"label {k!r}: value must be a string of at most 200 characters")
        out[k] = v
    return out


def parse_selector(items: list[str]) -> dict[str, str]:
    """`k=v` strings (CLI, query string) -> label filter."""
    sel: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise InvalidRequest(f"label selector {item[:80]!r}: expected key=value")
        sel[k] = v
    return check_labels(sel)


class DeviceRegistry:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create_enroll_token(self, created_by: str, uses: int, ttl_s: float,
                                  labels: Mapping[str, Any]) -> dict[str, Any]:
        if not 1 <= uses <= 100_000:
            raise InvalidRequest("uses must be between 1 and 100000")
        if not 0 < ttl_s <= 365 * 86400:
            raise InvalidRequest("ttl_s must be positive and at most a year")
        clean = check_labels(labels)
        secret, token_id, now = new_secret(ENROLL_PREFIX), new_id(), time.time()
        async with self.db.transaction() as s:
            s.add(EnrollToken(id=token_id, token_hash=hash_secret(secret), uses_left=uses,
                              expires_at=now + ttl_s, labels=clean, created_by=created_by, created_at=now))
        return {"id": token_id, "token": secret, "uses": uses, "expires_at": now + ttl_s, "labels": clean}

    async def check_enroll_token(self, enroll_secret: str) -> None:
        """Refuse an unknown, spent or expired enrollment token before its request's body is read.

        Only a read: the use is spent by `enroll`'s conditional UPDATE, which
        settles races; this keeps anonymous clients away from body parsing.
        """
        if not enroll_secret.startswith(ENROLL_PREFIX):
            raise Unauthenticated("enrollment needs an enrollment token")
        async with self.db.read() as s:
            usable = (await s.execute(select(EnrollToken.id).where(
                EnrollToken.token_hash == hash_secret(enroll_secret), EnrollToken.uses_left > 0,
                EnrollToken.expires_at > time.time()))).first()
        if usable is None:
            raise Unauthenticated("enrollment token unknown, used up or expired")

    async def enroll(self, enroll_secret: str, name: str, labels: Mapping[str, Any]) -> dict[str, Any]:
        if not enroll_secret.startswith(ENROLL_PREFIX):
            raise Unauthenticated("enrollment needs an enrollment token")
        clean = check_labels(labels)
        now = time.time()
        device_id, credential = new_id(), new_secret(DEVICE_PREFIX)
        async with self.db.transaction() as s:
            spent = (await s.execute(
                update(EnrollToken)
                .where(EnrollToken.token_hash == hash_secret(enroll_secret), EnrollToken.uses_left > 0,
                       EnrollToken.expires_at > now)
                .values(uses_left=EnrollToken.uses_left - 1)
                .returning(EnrollToken.labels))).first()
            if spent is None:
                raise Unauthenticated("enrollment token unknown, used up or expired")
            merged = {**(spent.labels or {}), **clean}
            s.add(Device(id=device_id, name=name[:200] or device_id, credential_hash=hash_secret(credential),
                         enrolled_at=now, assignment_serial=0, assignment_changed_at=now))
            await s.flush()
            s.add_all(DeviceLabel(device_id=device_id, key=k, value=v) for k, v in merged.items())
        return {"device_id": device_id, "credential": credential, "labels": merged}

    async def list_devices(self, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        q = select(Device).order_by(Device.enrolled_at)
        for k, v in selector.items():
            q = q.where(Device.id.in_(select(DeviceLabel.device_id).where(DeviceLabel.key == k,
                                                                          DeviceLabel.value == v)))
        async with self.db.read() as s:
            devices = list((await s.execute(q)).scalars())
            labels = await self._labels(s, [d.id for d in devices])
        return [device_view(d, labels.get(d.id, {})) for d in devices]

    async def show(self, device_id: str) -> dict[str, Any]:
        async with self.db.read() as s:
            d = await s.get(Device, device_id)
            if d is None:
                raise NotFound(f"no device {device_id}")
            labels = await self._labels(s, [device_id])
            assigned = (await s.execute(
                select(Bundle.name, Bundle.version, Bundle.revoked_at)
                .join(AssignmentItem, AssignmentItem.bundle_id == Bundle.id)
                .where(AssignmentItem.device_id == device_id).order_by(Bundle.name))).all()
        view = device_view(d, labels.get(device_id, {}))
        view["assigned"] = [f"{n}@{v}" for n, v, _ in assigned]
        view["assigned_revoked"] = [f"{n}@{v}" for n, v, r in assigned if r is not None]
        view["state"] = d.state
        return view

    async def set_labels(self, device_id: str, labels: Mapping[str, Any]) -> dict[str, Any]:
        clean = check_labels(labels)
        async with self.db.transaction() as s:
            if await s.get(Device, device_id, with_for_update=True) is None:
                raise NotFound(f"no device {device_id}")
            await s.execute(delete(DeviceLabel).where(DeviceLabel.device_id == device_id))
            s.add_all(DeviceLabel(device_id=device_id, key=k, value=v) for k, v in clean.items())
        return await self.show(device_id)

    async def delete(self, device_id: str) -> None:
        async with self.db.transaction() as s:
            result = await s.execute(delete(Device).where(Device.id == device_id).returning(Device.id))
            if result.first() is None:
                raise NotFound(f"no device {device_id}")
            s.add(Revocation(kind="device", subject=device_id, at=time.time()))

    @staticmethod
    async def _labels(s: Any, ids: list[str]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if not ids:
            return out
        for i in range(0, len(ids), 500):
            rows = await s.execute(select(DeviceLabel).where(DeviceLabel.device_id.in_(ids[i:i + 500])))
            for lbl in rows.scalars():
                out.setdefault(lbl.device_id, {})[lbl.key] = lbl.value
        return out


def device_view(d: Device, labels: dict[str, str]) -> dict[str, Any]:
    state = d.state or {}
    return {
        "id": d.id, "name": d.name, "labels": labels, "enrolled_at": d.enrolled_at,
        "last_seen_at": d.last_seen_at, "assignment_serial": d.assignment_serial,
        "agent_version": state.get("agent_version"), "health": (state.get("health") or {}).get("status"),
        "active": [b.get("ref") for b in state.get("bundles", []) if b.get("active")],
    }
