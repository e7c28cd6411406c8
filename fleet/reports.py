"""Device heartbeats and telemetry: latest state per device, plus a bounded time series.

A report carries the heartbeat (agent version, hardware, installed and active
bundles with their engine and fallback reasons, health) and zero or more
telemetry windows. The heartbeat replaces the device's latest state (one row,
so listing a fleet never scans history); each window becomes one raw point of
flattened metrics (``requests``, ``cpu_percent``, ``models.NAME.p99_ms``...).

Retention: raw points older than `raw_retention_s` are folded into one point
per device and bucket (counters summed, latency percentiles by their maximum,
which over-states rather than hides a bad window, other gauges averaged), and
folded points older than `downsampled_retention_s` are dropped. Folding deletes
the raw rows first and inserts the aggregate only if it deleted all of them, so
two fleet processes doing maintenance at once cannot double-count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update

from contract.report import STATE_FIELDS, SYSTEM_METRICS

from .config import RetentionConfig
from .db import Bundle, Database, Device, DeviceBundle, TelemetryPoint
from .errors import NotFound

log = logging.getLogger(__name__)
_COUNTER_SUFFIXES = ("requests", "errors", "nan_count")
_MAX_SUFFIXES = ("p50_ms", "p95_ms", "p99_ms")
_GAUGES = (*SYSTEM_METRICS, "requests", "errors")


def flatten_window(window: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in _GAUGES:
        v = window.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    for model, stats in (window.get("models") or {}).items():
        for key, v in stats.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"models.{model}.{key}"] = float(v)
        # custom metrics the bundle declares (rollout gates read them): models.NAME.metrics.METRIC
        for key, v in (stats.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"models.{model}.metrics.{key}"] = float(v)
    return out


def fold(points: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for p in points for k in p}
    out: dict[str, float] = {}
    for k in keys:
        values = [p[k] for p in points if k in p]
        if k.endswith(_COUNTER_SUFFIXES):
            out[k] = sum(values)
        elif k.endswith(_MAX_SUFFIXES):
            out[k] = max(values)
        else:
            out[k] = sum(values) / len(values)
    return out


def _bundles_digest(bundles: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(_installed(bundles), sort_keys=True).encode()).hexdigest()


def _installed(bundles: list[dict[str, Any]]) -> dict[str, bool]:
    seen: dict[str, bool] = {}
    for b in bundles:
        seen[b["ref"]] = seen.get(b["ref"], False) or bool(b.get("active"))
    return seen


def _resolution(window: dict[str, Any], now: float, bucket_s: int) -> int:
    end = float(window.get("end", now))
    return max(0, min(int(end - float(window.get("start", end))), bucket_s - 1))


@dataclass
class Prepared:
    """A validated report turned into rows, before any database work."""

    device_id: str
    state: dict[str, Any]
    bundles: list[dict[str, Any]] | None
    digest: str | None
    points: list[dict[str, Any]]


class Reports:
    def __init__(self, db: Database, retention: RetentionConfig) -> None:
        self.db = db
        self.retention = retention

    def prepare(self, device_id: str, report: dict[str, Any], now: float) -> Prepared:
        state: dict[str, Any] = {k: report[k] for k in STATE_FIELDS if k in report}
        state["received_at"] = now
        bucket = self.retention.downsample_bucket_s
        points = [{"device_id": device_id, "ts": min(float(w.get("end", now)), now + 300),
                   "resolution_s": _resolution(w, now, bucket), "metrics": flatten_window(w)}
                  for w in report.get("telemetry") or []]
        bundles = report.get("bundles")
        return Prepared(device_id, state, bundles, _bundles_digest(bundles) if bundles is not None else None, points)

    async def ingest(self, device_id: str, report: dict[str, Any]) -> tuple[int, bool]:
        """Store one report alone; returns (telemetry points written, assignment serial bumped).

        The server normally goes through `fleet.ingest.ReportBatcher`, which
        stores many reports per transaction and falls back to this one by one.
        """
        now = time.time()
        p = self.prepare(device_id, report, now)
        async with self.db.transaction() as s:
            stored = (await s.execute(select(Device.bundles_digest).where(Device.id == device_id))).first()
            if stored is None:
                raise NotFound(f"no device {device_id}")
            digest = p.digest if p.bundles is not None else stored[0]
            await s.execute(update(Device).where(Device.id == device_id)
                            .values(last_seen_at=now, state=p.state, bundles_digest=digest))
            changed = {device_id: p} if p.bundles is not None and p.digest != stored[0] else {}
            bumped = await self.record_installed(s, changed, now)
            if p.points:
                await s.execute(insert(TelemetryPoint), p.points)
        return len(p.points), device_id in bumped

    @staticmethod
    async def record_installed(s: Any, changed: dict[str, Prepared], now: float) -> set[str]:
        """Rewrite what these devices have installed, in a constant number of statements.

        A device that newly reports a revoked bundle gets its serial bumped, so
        its next assignment document (listing it under `revoked`) reaches it;
        returns the ids of those devices.
        """
        if not changed:
            return set()
        ids = list(changed)
        previous: dict[str, dict[str, bool]] = defaultdict(dict)
        for device_id, ref, active in (await s.execute(
                select(DeviceBundle.device_id, DeviceBundle.ref, DeviceBundle.active)
                .where(DeviceBundle.device_id.in_(ids)))).all():
            previous[device_id][ref] = active
        new = {d: _installed(p.bundles or []) for d, p in changed.items()}
        differs = [d for d in ids if previous[d] != new[d]]
        if not differs:
            return set()
        await s.execute(delete(DeviceBundle).where(DeviceBundle.device_id.in_(differs)))
        rows = [{"device_id": d, "ref": ref, "active": act} for d in differs for ref, act in new[d].items()]
        if rows:
            await s.execute(insert(DeviceBundle), rows)
        added = {d: set(new[d]) - set(previous[d]) for d in differs}
        candidates = set().union(*added.values())
        if not candidates:
            return set()
        ref = Bundle.name + "@" + Bundle.version
        revoked = set((await s.execute(select(ref).where(Bundle.revoked_at.is_not(None),
                                                         ref.in_(candidates)))).scalars())
        bump = [d for d, refs in added.items() if refs & revoked]
        if bump:
            # An SQL expression, not a Python increment: a concurrent assignment change must not be lost.
            await s.execute(update(Device).where(Device.id.in_(bump))
                            .values(assignment_serial=Device.assignment_serial + 1, assignment_changed_at=now))
        return set(bump)

    async def series(self, device_id: str, since: float | None, until: float | None,
                     limit: int) -> list[dict[str, Any]]:
        q = select(TelemetryPoint).where(TelemetryPoint.device_id == device_id)
        if since is not None:
            q = q.where(TelemetryPoint.ts >= since)
        if until is not None:
            q = q.where(TelemetryPoint.ts <= until)
        async with self.db.read() as s:
            if await s.get(Device, device_id) is None:
                raise NotFound(f"no device {device_id}")
            rows = (await s.execute(q.order_by(TelemetryPoint.ts.desc()).limit(limit))).scalars().all()
        return [{"ts": p.ts, "resolution_s": p.resolution_s, "metrics": p.metrics} for p in reversed(rows)]

    async def maintain(self, now: float | None = None, batch: int = 5000) -> tuple[int, int]:
        """One retention pass; returns (raw points folded, old points dropped)."""
        now = time.time() if now is None else now
        bucket = self.retention.downsample_bucket_s
        cutoff = math.floor((now - self.retention.raw_retention_s) / bucket) * bucket
        folded = 0
        while True:
            async with self.db.read() as s:
                rows = (await s.execute(
                    select(TelemetryPoint.id, TelemetryPoint.device_id, TelemetryPoint.ts, TelemetryPoint.metrics)
                    .where(TelemetryPoint.resolution_s < bucket, TelemetryPoint.ts < cutoff)
                    .order_by(TelemetryPoint.device_id, TelemetryPoint.ts).limit(batch))).all()
            if not rows:
                break
            groups: dict[tuple[str, int], list[Any]] = defaultdict(list)
            for r in rows:
                groups[(r.device_id, math.floor(r.ts / bucket))].append(r)
            for (device_id, b), members in groups.items():
                folded += await self._fold_group(device_id, (b + 1) * bucket, members)
            if len(rows) < batch:
                break
        async with self.db.transaction() as s:
            dropped = (await s.execute(
                delete(TelemetryPoint).where(TelemetryPoint.resolution_s >= bucket,
                                             TelemetryPoint.ts < now - self.retention.downsampled_retention_s)
                .returning(TelemetryPoint.id))).all()
        return folded, len(dropped)

    async def _fold_group(self, device_id: str, bucket_end: float, members: list[Any]) -> int:
        ids = [m.id for m in members]
        try:
            async with self.db.transaction() as s:
                deleted = len((await s.execute(delete(TelemetryPoint).where(TelemetryPoint.id.in_(ids))
                                               .returning(TelemetryPoint.id))).all())
                if deleted != len(ids):
                    raise _Raced  # another process folded (some of) these first: undo, leave its result
                s.add(TelemetryPoint(device_id=device_id, ts=bucket_end,
                                     resolution_s=self.retention.downsample_bucket_s,
                                     metrics=fold([m.metrics for m in members])))
        except _Raced:
            return 0
        return len(ids)


class _Raced(Exception):
    pass
