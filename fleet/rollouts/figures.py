"""Reading what the gates judge: device states, hardware kinds and telemetry aggregates per version.

Telemetry points are stored per device (`fleet.reports`); here they are summed
per bundle version across the devices of a rollout: a device's points count
for the new version only after it first reported that version active
(`converged_at`), and for the replaced one from the window before it was
switched (`baseline`, taken once when the device enters the rollout).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from ..db import Device, DeviceLabel, TelemetryPoint
from .gates import Aggregate

CHUNK = 500


def hardware_kind(labels: dict[str, str], state: dict[str, Any] | None, label: str) -> str:
    """The label when set, else the reported GPU name, else the CPU architecture."""
    if labels.get(label):
        return labels[label][:200]
    hw = (state or {}).get("hardware") or {}
    for key in ("gpu_name", "architecture", "cpu"):
        if isinstance(hw.get(key), str) and hw[key]:
            return str(hw[key])[:200]
    return "unknown"


def chunks(ids: Sequence[str]) -> Iterable[list[str]]:
    for i in range(0, len(ids), CHUNK):
        yield list(ids[i:i + CHUNK])


async def pool(s: AsyncSession, labels: dict[str, str], devices: Sequence[str],
               hardware_label: str) -> list[tuple[str, str]]:
    """(device id, hardware kind) of every device the selector matches now."""
    q = select(Device.id, Device.state)
    if devices:
        q = q.where(Device.id.in_(list(devices)))
    for k, v in labels.items():
        q = q.where(Device.id.in_(select(DeviceLabel.device_id).where(DeviceLabel.key == k, DeviceLabel.value == v)))
    rows = (await s.execute(q)).all()
    ids = [r[0] for r in rows]
    hw_labels: dict[str, str] = {}
    for part in chunks(ids):
        got = await s.execute(select(DeviceLabel.device_id, DeviceLabel.value)
                              .where(DeviceLabel.key == hardware_label, DeviceLabel.device_id.in_(part)))
        hw_labels.update({d: v for d, v in got.all()})
    return [(r[0], hardware_kind({hardware_label: hw_labels[r[0]]} if r[0] in hw_labels else {}, r[1],
                                 hardware_label)) for r in rows]


def point_aggregate(metrics: dict[str, float], models: Sequence[str]) -> Aggregate:
    """One telemetry point's figures for the bundle's models."""
    a = Aggregate()
    for m in models:
        pre = f"models.{m}."
        n = metrics.get(pre + "requests", 0.0)
        if n <= 0:
            continue
        a.requests += n
        a.errors += metrics.get(pre + "errors", 0.0)
        a.nan_count += metrics.get(pre + "nan_count", 0.0)
        p95 = metrics.get(pre + "p95_ms")
        if p95 is not None:
            a.p95_weighted += p95 * n
            a.p95_max = max(a.p95_max, p95)
        for key, v in metrics.items():
            if key.startswith(pre + "metrics."):
                name = key[len(pre) + 8:]
                a.metrics[name] = a.metrics.get(name, 0.0) + v * n
    return a


async def device_aggregates(s: AsyncSession, since: dict[str, float], models: Sequence[str],
                            until: dict[str, float] | None = None) -> dict[str, Aggregate]:
    """Per device: its points with `since[d] < ts` (and `ts <= until[d]` when given)."""
    out: dict[str, Aggregate] = {}
    ids = sorted(since)
    for part in chunks(ids):
        lo = min(since[d] for d in part)
        rows = await s.execute(select(TelemetryPoint.device_id, TelemetryPoint.ts, TelemetryPoint.metrics)
                               .where(TelemetryPoint.device_id.in_(part), TelemetryPoint.ts > lo))
        for device_id, ts, metrics in rows.all():
            if ts <= since[device_id] or (until is not None and ts > until[device_id]):
                continue
            a = point_aggregate(metrics, models)
            if a.requests:
                mine = out.setdefault(device_id, Aggregate())
                a.devices = 0
                mine.add(a)
    for a in out.values():
        a.devices = 1
    return out
