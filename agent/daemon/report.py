"""The heartbeat the agent sends: built from the state records, the data plane and the system sampler.

Every report carries the last `RECENT_EVENTS` events (refusals, switches,
reverts), persisted in the agent state, so the fleet's latest view of the
device shows them even after restarts; the fleet tells repeats apart by their
`at`. The Reporter keeps reports through fleet outages.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

from contract import Event, Health, ModelState, ModelStats, TelemetryWindow, build_report

from ..dataplane import DataPlane, ServedModel
from .state import AgentState, StateStore

RECENT_EVENTS = 20


class ReportBuilder:
    def __init__(self, dataplane: DataPlane, store: StateStore, agent_state: AgentState, agent_version: str,
                 hardware: dict[str, Any], sample: Callable[[], dict[str, float]],
                 runtime: dict[str, str | None] | None = None) -> None:
        self.dataplane = dataplane
        self.store = store
        self.state = agent_state
        self.agent_version = agent_version
        self.hardware = hardware
        self.sample = sample
        self.runtime = {"python": platform.python_version(), **(runtime or {})}
        self._window_start = time.time()
        self._seen: dict[tuple[str, str], tuple[int, int]] = {}

    def _stats(self, sm: ServedModel) -> ModelStats:
        m = sm.metrics
        tail = m.tail.snapshot()
        return ModelStats(requests=m.requests, errors=sum(m.failures.values()), nan_count=m.non_finite,
                          p50_ms=tail.p50_ms, p95_ms=tail.p95_ms, p99_ms=tail.p99_ms)

    def build(self) -> dict[str, Any]:
        now = time.time()
        served = {sm.bundle.manifest.name: sm for sm in self.dataplane.active_models()}
        by_bundle: dict[str, list[ServedModel]] = {}
        for sm in self.dataplane.active_models():
            by_bundle.setdefault(sm.bundle.manifest.name, []).append(sm)
        models, bundles = [], []
        window_models: dict[str, ModelStats] = {}
        for rec in self.store.all():
            staged = rec.pending.version if rec.pending is not None else None
            lkg = rec.last_known_good.version if rec.last_known_good is not None else None
            sms = by_bundle.get(rec.name, [])
            failed = self.dataplane.failed.get(rec.name)
            if not sms:
                models.append(ModelState(name=rec.name, active=None, staged=staged, last_known_good=lkg,
                                         health=Health("failing", failed) if failed else None))
            for sm in sms:
                stats = self._stats(sm)
                window_models[sm.name] = stats
                models.append(ModelState(
                    name=sm.name, active=sm.version, staged=staged, last_known_good=lkg, backend=sm.runner.backend,
                    fallback_reasons=tuple(f"{f.backend}: {f.reason}" for f in sm.runner.fallbacks),
                    health=Health("ok"), stats=stats))
            if rec.active is not None:
                sm0 = served.get(rec.name)
                entry: dict[str, Any] = {"ref": f"{rec.name}@{rec.active.version}", "active": sm0 is not None}
                if sm0 is not None:
                    entry["engine"] = sm0.runner.backend
                bundles.append(entry)
        events = [Event(**e) for e in self.state.events[-RECENT_EVENTS:]]
        window = TelemetryWindow(start=self._window_start, end=now, requests=sum(s.requests for s in
                                                                                 window_models.values()),
                                 errors=sum(s.errors for s in window_models.values()), system=self.sample(),
                                 models=window_models)
        self._window_start = now
        health = Health("ok") if not self.dataplane.failed else Health(
            "degraded", "; ".join(f"{k}: {v}" for k, v in self.dataplane.failed.items())[:2000])
        assignment = {"serial": self.state.serial, "expires_at": self.state.expires_at} if self.state.serial else None
        return build_report(agent_version=self.agent_version, time=now, hardware=self.hardware,
                            runtime=self.runtime, bundles=bundles[:64], models=models[:64],
                            health=health, assignment=assignment, events=events, telemetry=[window])
