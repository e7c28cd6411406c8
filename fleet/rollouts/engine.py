"""The rollout engine: one loop per fleet process that runs the rollouts whose lease it holds.

Each tick (`RolloutConfig.eval_interval_s`, or at once when kicked by an
operator action) it claims the leases of unsettled rollouts, and for each:

1. fills the current stage (picks canaries spread across hardware kinds,
   remembers each one's previous version and baseline figures);
2. reconciles assignments: every device of the rollout gets the new version,
   or its previous one back once the rollout is rolled back or aborted
   (idempotent, so a process that died half-way is finished by the next owner);
3. evaluates the gates of a running rollout and persists the machine's
   decision with compare-and-swap, writing the audit event in the same
   transaction.

Everything lives in the database, so a restarted fleet resumes where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from typing import Any, Protocol

from sqlalchemy import select, update

from runtime.timeouts import timeout

from ..assignments import Assignments
from ..config import RolloutConfig
from ..db import AssignmentItem, Bundle, Database, Device, Rollout, RolloutDevice
from ..errors import FleetError, NotFound
from . import figures, gates, machine
from .spec import Spec
from .store import RolloutStore, Stale, cas, event, state_of

log = logging.getLogger(__name__)
#: Passes of one step over one rollout: fill, reconcile, decide; again after a stage change.
_MAX_PASSES = 8


class Nudger(Protocol):
    def nudge(self, serials: dict[str, int]) -> None: ...


def _category(reason: str) -> str:
    return reason.split(":", 1)[0].split("(", 1)[0].strip()


class RolloutEngine:
    def __init__(self, db: Database, assignments: Assignments, config: RolloutConfig,
                 nudger: Nudger | None = None, owner: str | None = None) -> None:
        self.db = db
        self.assignments = assignments
        self.config = config
        self.store = RolloutStore(db)
        self.nudger = nudger
        self.owner = owner or f"{socket.gethostname()[:40]}:{os.getpid()}:{id(self) % 10000}"
        self._kick = asyncio.Event()
        self.ticks = 0

    @property
    def actor(self) -> str:
        return f"engine:{self.owner}"

    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> None:
        failing = False
        try:
            while True:
                self._kick.clear()
                try:
                    await self.tick()
                except Exception as e:
                    if not failing:
                        log.warning("rollout engine failing: %s", e)
                    failing = True
                else:
                    if failing:
                        log.warning("rollout engine recovered")
                    failing = False
                with contextlib.suppress(asyncio.TimeoutError):
                    async with timeout(self.config.eval_interval_s):
                        await self._kick.wait()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release(self.owner))

    async def tick(self) -> None:
        for rollout_id in await self.store.claim(self.owner, self.config.lease_s):
            try:
                await self.step(rollout_id)
            except Stale:
                pass  # someone acted first: look again next tick
            except FleetError as e:
                log.warning("rollout %s: %s", rollout_id, e.message)
        self.ticks += 1

    async def step(self, rollout_id: str) -> None:
        for _ in range(_MAX_PASSES):  # a promotion fills the next stage at once
            r = await self.store.get(rollout_id)
            if r.lease_owner != self.owner:
                return
            spec = Spec.from_dict(r.spec)
            if r.status in machine.ACTIVE and await self._fill(r, spec):
                r = await self.store.get(rollout_id)
            pending = await self._reconcile(r, spec)
            if r.status in machine.FINAL:
                if not pending:
                    async with self.db.transaction() as s:
                        await cas(s, r.id, r.version, settled=True, lease_owner=None, lease_until=0.0)
                return
            if r.status != "running" or not await self._evaluate(r, spec):
                return

    # -- 1. stages -------------------------------------------------------------------------------
    async def _fill(self, r: Rollout, spec: Spec) -> bool:
        name = spec.bundle.partition("@")[0]
        now = time.time()
        async with self.db.read() as s:
            pool = await figures.pool(s, spec.labels, spec.devices, spec.hardware_label)
            taken = set((await s.execute(select(RolloutDevice.device_id)
                                         .where(RolloutDevice.rollout_id == r.id))).scalars())
            new = machine.plan(pool, taken, spec.stages[r.stage].size(len(pool)), r.id)
            if not new:
                return False
            previous: dict[str, str] = {}
            for part in figures.chunks(new):
                rows = await s.execute(select(AssignmentItem.device_id, Bundle.version)
                                       .join(Bundle, Bundle.id == AssignmentItem.bundle_id)
                                       .where(AssignmentItem.device_id.in_(part), Bundle.name == name))
                previous.update({d: f"{name}@{v}" for d, v in rows.all()})
            baselines = await figures.device_aggregates(s, [d for d in new if d in previous],
                                                        now - spec.gates.baseline_window_s, spec.models,
                                                        [m.name for m in spec.gates.metrics])
        kinds = dict(pool)
        async with self.db.transaction() as s:
            await cas(s, r.id, r.version)
            s.add_all(RolloutDevice(rollout_id=r.id, device_id=d, stage=r.stage, hardware=kinds[d],
                                    previous_ref=previous.get(d),
                                    assigned_at=now, converged_at=None,
                                    baseline=baselines[d].to_dict() if d in baselines else None) for d in new)
            event(s, r.id, self.actor, "assigned", r.stage,
                  {"added": len(new), "stage_size": len(taken) + len(new), "pool": len(pool),
                   "by_hardware": dict(Counter(kinds[d] for d in new))})
        return True

    # -- 2. assignments ---------------------------------------------------------------------------
    async def _reconcile(self, r: Rollout, spec: Spec) -> int:
        name = spec.bundle.partition("@")[0]
        back = r.status in machine.ROLLED_BACK
        async with self.db.read() as s:
            members = (await s.execute(select(RolloutDevice.device_id, RolloutDevice.previous_ref)
                                       .where(RolloutDevice.rollout_id == r.id))).all()
            want = {d: (prev if back else spec.bundle) for d, prev in members}
            current: dict[str, list[str]] = {d: [] for d in want}
            for part in figures.chunks(list(want)):
                rows = await s.execute(select(AssignmentItem.device_id, Bundle.name, Bundle.version)
                                       .join(Bundle, Bundle.id == AssignmentItem.bundle_id)
                                       .where(AssignmentItem.device_id.in_(part)))
                for d, n, v in rows.all():
                    current[d].append(f"{n}@{v}")
        todo: dict[str, list[str]] = {}
        for d, refs in current.items():
            target = want[d]
            wanted = [target] if target else []
            if [x for x in refs if x.partition("@")[0] == name] != wanted:
                todo[d] = [x for x in refs if x.partition("@")[0] != name] + wanted
        if not todo:
            return 0
        serials: dict[str, int] = {}
        gone: set[str] = set()
        sem = asyncio.Semaphore(8)

        async def one(device_id: str, refs: list[str]) -> None:
            async with sem:
                try:
                    serials[device_id] = await self.assignments.set(device_id, refs)
                except NotFound:
                    gone.add(device_id)  # deleted meanwhile: nothing left to assign
                except FleetError as e:  # a revoked old version: leave it, say why
                    log.warning("rollout %s: cannot assign %s to %s: %s", r.id, refs, device_id, e.message)

        await asyncio.gather(*(one(d, refs) for d, refs in todo.items()))
        if self.nudger is not None and serials:
            self.nudger.nudge(serials)
        if back:
            async with self.db.transaction() as s:
                event(s, r.id, self.actor, "rollback_assigned", r.stage,
                      {"devices": len(serials), "gone": len(gone), "failed": len(todo) - len(serials) - len(gone)})
        return len(todo) - len(serials) - len(gone)

    # -- 3. gates ---------------------------------------------------------------------------------
    async def _evaluate(self, r: Rollout, spec: Spec) -> bool:
        """Judge the running stage; True when the stage changed (the caller steps again)."""
        now = time.time()
        g = spec.gates
        async with self.db.read() as s:
            members = list((await s.execute(select(RolloutDevice)
                                            .where(RolloutDevice.rollout_id == r.id))).scalars())
            states: dict[str, Any] = {}
            for part in figures.chunks([m.device_id for m in members]):
                rows = await s.execute(select(Device.id, Device.state).where(Device.id.in_(part)))
                states.update(dict(rows.all()))
        statuses: list[gates.DeviceStatus] = []
        newly: list[str] = []
        for m in members:
            state = states.get(m.device_id) or {}
            entry = next((b for b in state.get("bundles") or [] if b.get("ref") == spec.bundle), None)
            on_new = entry is not None and bool(entry.get("active"))
            if on_new and m.converged_at is None:
                newly.append(m.device_id)
            statuses.append(gates.DeviceStatus(
                hardware=m.hardware, converged=on_new,
                install_failed=not on_new and now - m.assigned_at > g.install_timeout_s,
                unhealthy=on_new and (state.get("health") or {}).get("status") == "failing",
                engine=entry.get("engine") if on_new and entry else None))
        if newly:
            async with self.db.transaction() as s:
                await s.execute(update(RolloutDevice).where(RolloutDevice.rollout_id == r.id,
                                                            RolloutDevice.device_id.in_(newly))
                                .values(converged_at=now))
        async with self.db.read() as s:
            new = await figures.stage_aggregates(s, r.id, r.stage_started_at, spec.models,
                                                 [m.name for m in g.metrics])
        base: dict[str, gates.Aggregate] = {}
        for m in members:
            if m.baseline:
                base.setdefault(m.hardware, gates.Aggregate()).add(gates.Aggregate.from_dict(m.baseline))
        stage = spec.stages[r.stage]
        results = gates.evaluate(g, statuses, new, base, stage.min_requests)
        decision = machine.decide(spec, state_of(r), results, now)
        evaluation = {"at": now, "stage": r.stage, "decision": decision.kind, "reason": decision.reason,
                      "results": [x.to_dict() for x in results],
                      "figures": {k: {"requests": a.requests, "p95_ms": a.p95_ms, "devices": a.devices}
                                  for k, a in sorted(new.items())},
                      "inconclusive_since": decision.inconclusive_since}
        values: dict[str, Any] = {"failed_evaluations": decision.failed_evaluations, "reason": decision.reason,
                                  "evaluation": evaluation}
        if decision.kind == "promote":
            values.update(stage=r.stage + 1, stage_started_at=now, failed_evaluations=0)
        elif decision.kind == "complete":
            values.update(status="succeeded")
        elif decision.kind == "halt":
            values.update(status="rolled_back")
        elif decision.kind == "pause":
            values.update(status="paused")
        record = decision.kind != "hold" or _category(decision.reason) != _category(r.reason)
        async with self.db.transaction() as s:
            if not await self.store.holds(s, r.id, self.owner):
                raise Stale(r.id)
            await cas(s, r.id, r.version, **values)
            if record:
                event(s, r.id, self.actor, "hold" if decision.kind == "hold" else
                      {"promote": "promoted", "complete": "completed", "halt": "halted",
                       "pause": "paused"}[decision.kind], r.stage,
                      {"reason": decision.reason, "results": evaluation["results"],
                       "figures": evaluation["figures"]})
        if decision.kind != "hold":
            log.info("rollout %s (%s): %s: %s", r.id, spec.bundle, decision.kind, decision.reason)
        return decision.changes_stage
