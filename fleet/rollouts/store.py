"""Persistence of rollouts beside the pure machine: rows, compare-and-swap writes, leases, the audit log.

Every write to a rollout names the `version` it read and bumps it (`cas`); a
write that finds another version changes nothing and raises `Stale`, so an
engine decision taken on a state an operator changed meanwhile is dropped,
never applied over it. Which process runs a rollout's engine is a lease on the
row (`claim`): taken when free or expired, renewed by its owner every tick.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ..auth import new_id
from ..db import Bundle, Database, Rollout, RolloutDevice, RolloutEvent
from ..errors import Conflict, NotFound
from . import machine
from .spec import Spec, resolve


class Stale(Exception):
    """The rollout changed since it was read (another process or an operator acted first)."""


def state_of(r: Rollout) -> machine.State:
    since = (r.evaluation or {}).get("inconclusive_since")
    return machine.State(r.status, r.stage, r.stage_started_at, r.failed_evaluations, since)


async def cas(s: AsyncSession, rollout_id: str, version: int, **values: Any) -> None:
    done = (await s.execute(update(Rollout).where(Rollout.id == rollout_id, Rollout.version == version)
                            .values(version=version + 1, updated_at=time.time(), **values)
                            .returning(Rollout.id))).first()
    if done is None:
        raise Stale(rollout_id)


def event(s: AsyncSession, rollout_id: str, actor: str, kind: str, stage: int, detail: dict[str, Any]) -> None:
    s.add(RolloutEvent(rollout_id=rollout_id, at=time.time(), actor=actor, kind=kind, stage=stage, detail=detail))


class RolloutStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, body: dict[str, Any], actor: str) -> Rollout:
        name, _, version = str(body["bundle"]).partition("@")
        async with self.db.transaction() as s:
            b = (await s.execute(select(Bundle).where(Bundle.name == name, Bundle.version == version))).scalar()
            if b is None:
                raise NotFound(f"no bundle {name}@{version}")
            if b.revoked_at is not None:
                raise Conflict(f"{name}@{version} is revoked and cannot be rolled out")
            spec = resolve(body, b.manifest)
            busy = (await s.execute(select(Rollout.id).where(Rollout.bundle_name == name,
                                                             Rollout.status.in_(machine.ACTIVE)))).first()
            if busy is not None:
                raise Conflict(f"rollout {busy[0]} of {name} is still active; let it finish or abort it first")
            now = time.time()
            row = Rollout(id=new_id(), bundle_name=name, bundle_version=version, spec=spec.to_dict(),
                          status="running", stage=0, stage_started_at=now, failed_evaluations=0, reason="starting",
                          evaluation=None, created_at=now, created_by=actor, updated_at=now, version=0,
                          lease_owner=None, lease_until=0.0, settled=False)
            s.add(row)
            await s.flush()
            event(s, row.id, actor, "created", 0, {"spec": spec.to_dict()})
        return row

    async def get(self, rollout_id: str) -> Rollout:
        async with self.db.read() as s:
            r = await s.get(Rollout, rollout_id)
        if r is None:
            raise NotFound(f"no rollout {rollout_id}")
        return r

    async def act(self, rollout_id: str, action: machine.Action, actor: str) -> Rollout:
        """An operator action, applied with compare-and-swap (retried if the engine wrote meanwhile)."""
        for _ in range(10):
            r = await self.get(rollout_id)
            spec = Spec.from_dict(r.spec)
            t = machine.act(state_of(r), action, len(spec.stages))
            values: dict[str, Any] = {"status": t.status, "stage": t.stage, "reason": t.reason}
            if t.stage != r.stage:
                values.update(stage_started_at=time.time(), failed_evaluations=0)
            if action == "resume":
                values.update(failed_evaluations=0, evaluation={**(r.evaluation or {}), "inconclusive_since": None})
            try:
                async with self.db.transaction() as s:
                    await cas(s, rollout_id, r.version, **values)
                    event(s, rollout_id, actor, t.event, r.stage,
                          {"reason": t.reason, "from": r.status, "to": t.status, "to_stage": t.stage,
                           "evaluation": r.evaluation})
            except Stale:
                continue
            return await self.get(rollout_id)
        raise Conflict(f"rollout {rollout_id} keeps changing; try again")

    async def claim(self, owner: str, lease_s: float) -> list[str]:
        """Take or renew the lease of every unsettled rollout that is free, expired or already ours."""
        now = time.time()
        async with self.db.transaction() as s:
            rows = (await s.execute(
                update(Rollout).where(Rollout.settled.is_(False),
                                      or_(Rollout.lease_owner == owner, Rollout.lease_owner.is_(None),
                                          Rollout.lease_until < now))
                .values(lease_owner=owner, lease_until=now + lease_s).returning(Rollout.id))).scalars().all()
        return sorted(rows)

    async def holds(self, s: AsyncSession, rollout_id: str, owner: str) -> bool:
        got = (await s.execute(select(Rollout.lease_owner, Rollout.lease_until)
                               .where(Rollout.id == rollout_id))).first()
        return got is not None and got[0] == owner and got[1] >= time.time()

    async def release(self, owner: str) -> None:
        async with self.db.transaction() as s:
            await s.execute(update(Rollout).where(Rollout.lease_owner == owner)
                            .values(lease_owner=None, lease_until=0.0))

    async def all(self, status: str | None = None, limit: int = 200) -> list[Rollout]:
        q = select(Rollout).order_by(Rollout.created_at.desc()).limit(limit)
        if status:
            q = q.where(Rollout.status == status)
        async with self.db.read() as s:
            return list((await s.execute(q)).scalars())

    async def events(self, rollout_id: str, limit: int = 500) -> list[RolloutEvent]:
        async with self.db.read() as s:
            return list((await s.execute(select(RolloutEvent).where(RolloutEvent.rollout_id == rollout_id)
                                         .order_by(RolloutEvent.id).limit(limit))).scalars())

    async def devices(self, rollout_id: str) -> list[RolloutDevice]:
        async with self.db.read() as s:
            return list((await s.execute(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
                                         .order_by(RolloutDevice.stage, RolloutDevice.device_id))).scalars())

    async def stage_counts(self, rollout_ids: Sequence[str]) -> dict[str, dict[int, tuple[int, int]]]:
        """rollout -> stage -> (devices taken in, devices converged)."""
        if not rollout_ids:
            return {}
        async with self.db.read() as s:
            rows = (await s.execute(
                select(RolloutDevice.rollout_id, RolloutDevice.stage, func.count(),
                       func.count(RolloutDevice.converged_at))
                .where(RolloutDevice.rollout_id.in_(list(rollout_ids)))
                .group_by(RolloutDevice.rollout_id, RolloutDevice.stage))).all()
        out: dict[str, dict[int, tuple[int, int]]] = {}
        for rid, stage, n, conv in rows:
            out.setdefault(rid, {})[stage] = (n, conv)
        return out


def view(r: Rollout, counts: dict[int, tuple[int, int]] | None = None,
         events: Sequence[RolloutEvent] | None = None) -> dict[str, Any]:
    spec = Spec.from_dict(r.spec)
    counts = counts or {}
    taken = 0
    stages = []
    for i, st in enumerate(spec.stages):
        n, conv = counts.get(i, (0, 0))
        taken += n
        stages.append({"index": i, "label": st.label, "soak_s": st.soak_s, "min_requests": st.min_requests,
                       "devices": taken if i <= r.stage else None, "added": n, "converged": conv,
                       "state": "done" if i < r.stage or r.status == "succeeded" else
                                ("current" if i == r.stage else "pending")})
    out: dict[str, Any] = {
        "id": r.id, "bundle": f"{r.bundle_name}@{r.bundle_version}", "status": r.status, "stage": r.stage,
        "stage_label": spec.stages[r.stage].label, "stages": stages, "reason": r.reason,
        "created_at": r.created_at, "created_by": r.created_by, "updated_at": r.updated_at,
        "stage_started_at": r.stage_started_at, "devices": taken, "evaluation": r.evaluation,
        "selector": {"labels": spec.labels} if not spec.devices else {"devices": list(spec.devices)},
        "gates": r.spec["gates"], "lease_owner": r.lease_owner,
        #: final, and every device's assignment already matches it (the rollback is assigned)
        "settled": r.settled,
    }
    if events is not None:
        out["events"] = [{"at": e.at, "actor": e.actor, "kind": e.kind, "stage": e.stage, "detail": e.detail}
                         for e in events]
    return out
