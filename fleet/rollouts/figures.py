"""Reading what the gates judge: device states, hardware kinds and telemetry aggregates per version.

Telemetry points are stored per device (`fleet.reports`); here the database sums
them per bundle version across the devices of a rollout (one grouped query, so
the cost on the event loop does not grow with the points): a device's points count
for the new version only after it first reported that version active
(`converged_at`), and for the replaced one from the window before it was
switched (`baseline`, taken once when the device enters the rollout).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import case, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..db import Device, DeviceLabel, RolloutDevice, TelemetryPoint
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


def _sums(models: Sequence[str], metrics: Sequence[str]) -> list[Any]:
    """Aggregate columns over telemetry points, computed by the database (no JSON reaches Python).

    Per model m of the bundle: requests, errors and NaNs summed; p95 weighted by
    requests (p95_weighted / requests is the request-weighted mean) and its
    maximum; custom metrics weighted likewise. Missing keys count as 0. Columns:
    requests, errors, nan_count, p95_weighted, devices, one p95 max per model,
    one weighted sum per metric (`_aggregate` reads them in that order).
    """
    def z(key: str) -> Any:
        return func.coalesce(TelemetryPoint.metrics[key].as_float(), 0.0)

    def total(parts: Iterable[Any]) -> Any:
        return functools.reduce(operator.add, parts, literal(0.0))

    req = {m: z(f"models.{m}.requests") for m in models}
    requests = total(req.values())
    return [
        func.sum(requests), func.sum(total(z(f"models.{m}.errors") for m in models)),
        func.sum(total(z(f"models.{m}.nan_count") for m in models)),
        func.sum(total(z(f"models.{m}.p95_ms") * req[m] for m in models)),
        func.count(func.distinct(case((requests > 0, TelemetryPoint.device_id)))),
        *(func.max(z(f"models.{m}.p95_ms")) for m in models),
        *(func.sum(total(z(f"models.{m}.metrics.{name}") * req[m] for m in models)) for name in metrics),
    ]


def _aggregate(row: Sequence[Any], models: Sequence[str], metrics: Sequence[str]) -> Aggregate:
    n = len(models)
    maxima = [float(v or 0) for v in row[5:5 + n]]
    return Aggregate(requests=float(row[0] or 0), errors=float(row[1] or 0), nan_count=float(row[2] or 0),
                     p95_weighted=float(row[3] or 0), p95_max=max(maxima, default=0.0), devices=int(row[4] or 0),
                     metrics={name: float(row[5 + n + i] or 0) for i, name in enumerate(metrics)})


async def stage_aggregates(s: AsyncSession, rollout_id: str, since: float, models: Sequence[str],
                           metrics: Sequence[str]) -> dict[str, Aggregate]:
    """Per hardware kind: the rollout's devices' points after `since` and after each one converged."""
    rows = await s.execute(
        select(RolloutDevice.hardware, *_sums(models, metrics))
        .join(TelemetryPoint, TelemetryPoint.device_id == RolloutDevice.device_id)
        .where(RolloutDevice.rollout_id == rollout_id, RolloutDevice.converged_at.is_not(None),
               TelemetryPoint.ts > since, TelemetryPoint.ts > RolloutDevice.converged_at)
        .group_by(RolloutDevice.hardware))
    return {r[0]: _aggregate(r[1:], models, metrics) for r in rows.all() if r[1]}


async def device_aggregates(s: AsyncSession, ids: Sequence[str], since: float, models: Sequence[str],
                            metrics: Sequence[str]) -> dict[str, Aggregate]:
    """Per device: its points after `since` (the replaced version's baseline before a switch)."""
    out: dict[str, Aggregate] = {}
    for part in chunks(list(ids)):
        rows = await s.execute(select(TelemetryPoint.device_id, *_sums(models, metrics))
                               .where(TelemetryPoint.device_id.in_(part), TelemetryPoint.ts > since)
                               .group_by(TelemetryPoint.device_id))
        out.update({r[0]: _aggregate(r[1:], models, metrics) for r in rows.all() if r[1]})
    return out
