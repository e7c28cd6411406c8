"""What the dashboard pages show, read in a constant number of queries per page.

The devices page reads one page of devices (LIMIT/OFFSET over the label
filter), their labels, and each one's latest telemetry point through the
(device_id, ts) index: cost grows with the page size, not the fleet.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select

from ..db import Bundle, Database, Device, DeviceBundle, DeviceLabel, Rollout, RolloutDevice, TelemetryPoint


def summarize_point(metrics: dict[str, float] | None) -> dict[str, float | None]:
    """p95 (worst model) and error rate (all models) of one telemetry point."""
    if not metrics:
        return {"p95_ms": None, "error_rate": None}
    p95 = [v for k, v in metrics.items() if k.startswith("models.") and k.endswith(".p95_ms")]
    req = sum(v for k, v in metrics.items() if k.startswith("models.") and k.endswith(".requests")
              and k.count(".") == 2)
    err = sum(v for k, v in metrics.items() if k.startswith("models.") and k.endswith(".errors")
              and k.count(".") == 2)
    return {"p95_ms": max(p95) if p95 else None, "error_rate": err / req if req else None}


def _filtered(q: Any, selector: dict[str, str]) -> Any:
    for k, v in selector.items():
        q = q.where(Device.id.in_(select(DeviceLabel.device_id).where(DeviceLabel.key == k, DeviceLabel.value == v)))
    return q


async def devices_page(db: Database, selector: dict[str, str], page: int, per_page: int) -> dict[str, Any]:
    async with db.read() as s:
        total = (await s.execute(_filtered(select(func.count()).select_from(Device), selector))).scalar_one()
        rows = (await s.execute(_filtered(
            select(Device.id, Device.name, Device.state, Device.last_seen_at), selector)
            .order_by(Device.name, Device.id).limit(per_page).offset((page - 1) * per_page))).all()
        ids = [r.id for r in rows]
        labels: dict[str, dict[str, str]] = {}
        latest: dict[str, dict[str, float]] = {}
        if ids:
            for d, k, v in (await s.execute(select(DeviceLabel.device_id, DeviceLabel.key, DeviceLabel.value)
                                            .where(DeviceLabel.device_id.in_(ids)))).all():
                labels.setdefault(d, {})[k] = v
            last = (select(TelemetryPoint.device_id, func.max(TelemetryPoint.ts).label("ts"))
                    .where(TelemetryPoint.device_id.in_(ids)).group_by(TelemetryPoint.device_id).subquery())
            for d, m in (await s.execute(
                    select(TelemetryPoint.device_id, TelemetryPoint.metrics)
                    .join(last, (last.c.device_id == TelemetryPoint.device_id) & (last.c.ts == TelemetryPoint.ts))
            )).all():
                latest[d] = m
    devices = []
    for r in rows:
        state = r.state or {}
        active = [b for b in state.get("bundles") or [] if b.get("active")]
        devices.append({
            "id": r.id, "name": r.name, "labels": labels.get(r.id, {}), "last_seen_at": r.last_seen_at,
            "health": (state.get("health") or {}).get("status"), "agent_version": state.get("agent_version"),
            "active": [b.get("ref") for b in active],
            "engines": sorted({b.get("engine") for b in active if b.get("engine")}),
            **summarize_point(latest.get(r.id)),
        })
    return {"total": total, "page": page, "per_page": per_page, "devices": devices,
            "pages": max(1, -(-total // per_page))}


async def catalog(db: Database) -> list[dict[str, Any]]:
    """Every bundle name: owner, description, SLO of its newest version, where versions run, last-known-good."""
    async with db.read() as s:
        bundles = list((await s.execute(select(Bundle).order_by(Bundle.name, Bundle.pushed_at))).scalars())
        running = dict((await s.execute(select(DeviceBundle.ref, func.count()).where(DeviceBundle.active.is_(True))
                                        .group_by(DeviceBundle.ref))).all())
        rollouts = list((await s.execute(select(Rollout).order_by(Rollout.created_at.desc()))).scalars())
        previous: dict[str, Counter[str]] = {}
        for rid, prev in (await s.execute(select(RolloutDevice.rollout_id, RolloutDevice.previous_ref)
                                          .where(RolloutDevice.previous_ref.is_not(None)))).all():
            previous.setdefault(rid, Counter())[str(prev)] += 1
    by_name: dict[str, list[Bundle]] = {}
    for b in bundles:
        by_name.setdefault(b.name, []).append(b)
    out = []
    for name, versions in sorted(by_name.items()):
        newest = versions[-1]
        service = newest.manifest.get("service") or {}
        mine = [r for r in rollouts if r.bundle_name == name]
        succeeded = [f"{name}@{r.bundle_version}" for r in mine if r.status == "succeeded"]
        active = [r for r in mine if r.status in ("running", "paused")]
        if active:
            lkg = succeeded[0] if succeeded else _most_common(previous.get(active[0].id))
        elif len(succeeded) > 1:
            lkg = succeeded[1]
        else:
            lkg = _most_common(previous.get(mine[0].id)) if mine else None
        out.append({
            "name": name, "owner": service.get("owner") or "", "description": service.get("description") or "",
            "slo": service.get("slo") or {}, "metrics": service.get("metrics") or [],
            "versions": [{"ref": f"{b.name}@{b.version}", "devices": running.get(f"{b.name}@{b.version}", 0),
                          "revoked": b.revoked_at is not None} for b in reversed(versions)],
            "rollback": lkg, "rollout": active[0].id if active else None,
        })
    return out


def _most_common(c: Counter[str] | None) -> str | None:
    return c.most_common(1)[0][0] if c else None
