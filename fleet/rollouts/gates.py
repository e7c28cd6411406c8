"""Gate verdicts: pure functions from aggregated figures to pass / fail / inconclusive.

Figures are aggregated per bundle version over the rollout's devices, per
hardware kind (a regression on one GPU kind must not hide in a fleet-wide
average), since the current stage started. Each gate gives one result per
kind with its value, threshold and sample size, so an operator (and the audit
log) sees exactly what decided. Not enough data is never a pass: it is
"inconclusive", which holds the stage.

Latency across devices: the request-weighted mean of the windows' p95 (an
estimate; percentiles do not add up). Custom metrics likewise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .spec import Gates, engine_kind

Verdict = Literal["pass", "fail", "inconclusive"]


@dataclass
class Aggregate:
    """Telemetry summed over devices and windows for one bundle version (and hardware kind)."""

    requests: float = 0.0
    errors: float = 0.0
    nan_count: float = 0.0
    #: Σ p95·requests, so that p95 = p95_weighted / requests.
    p95_weighted: float = 0.0
    p95_max: float = 0.0
    devices: int = 0
    #: metric name -> Σ value·requests
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, other: Aggregate) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.nan_count += other.nan_count
        self.p95_weighted += other.p95_weighted
        self.p95_max = max(self.p95_max, other.p95_max)
        self.devices += other.devices
        for k, v in other.metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v

    @property
    def p95_ms(self) -> float | None:
        return self.p95_weighted / self.requests if self.requests else None

    def rate(self, count: float) -> float | None:
        return count / self.requests if self.requests else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Aggregate:
        return cls(**d) if d else cls()


@dataclass
class DeviceStatus:
    """What the rollout knows of one of its devices (from its latest heartbeat)."""

    hardware: str
    converged: bool
    install_failed: bool
    unhealthy: bool
    #: Engine it runs the new version on, when it reported one.
    engine: str | None = None


@dataclass(frozen=True)
class GateResult:
    gate: str
    hardware: str
    verdict: Verdict
    value: float | None
    threshold: float | None
    n: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bound(gate: str, kind: str, value: float | None, threshold: float, n: float, enough: bool,
           *, upper: bool = True, note: str = "") -> GateResult:
    if value is None or not enough:
        return GateResult(gate, kind, "inconclusive", value, threshold, n, note or "not enough data yet")
    ok = value <= threshold if upper else value >= threshold
    return GateResult(gate, kind, "pass" if ok else "fail", value, threshold, n, note)


def telemetry_gates(g: Gates, kind: str, new: Aggregate, baseline: Aggregate, min_requests: float) -> list[GateResult]:
    enough = new.requests >= min_requests and new.devices > 0
    n = new.requests
    out: list[GateResult] = []
    if g.p95_ms is not None:
        out.append(_bound("p95_ms", kind, new.p95_ms, g.p95_ms, n, enough))
    if g.max_p95_regression_pct is not None:
        base = baseline.p95_ms
        if base is None:
            out.append(GateResult("p95_regression", kind, "pass", new.p95_ms, None, n,
                                  "no telemetry of a replaced version on these devices"))
        else:
            limit = base * (1 + g.max_p95_regression_pct / 100)
            out.append(_bound("p95_regression", kind, new.p95_ms, limit, n, enough,
                              note=f"replaced version p95 {base:.3g} ms"))
    out.append(_bound("error_rate", kind, new.rate(new.errors), g.max_error_rate, n, enough))
    out.append(_bound("nan_rate", kind, new.rate(new.nan_count), g.max_nan_rate, n, enough))
    for m in g.metrics:
        raw = new.metrics.get(m.name)
        value = raw / new.requests if raw is not None and new.requests else None
        if m.max is not None:
            out.append(_bound(f"metric:{m.name}", kind, value, m.max, n, enough))
        if m.min is not None:
            out.append(_bound(f"metric:{m.name}>=", kind, value, m.min, n, enough, upper=False))
    return out


def device_gates(g: Gates, kind: str, devices: list[DeviceStatus]) -> list[GateResult]:
    """Install, health and engine gates over the devices of one kind."""
    total = len(devices)
    failed = sum(d.install_failed for d in devices)
    on_new = [d for d in devices if d.converged]
    decided = failed + len(on_new)
    out = [_bound("install_failures", kind, failed / total if total else None, g.max_install_failure_rate, total,
                  total > 0 and (decided == total or failed / total > g.max_install_failure_rate),
                  note=f"{failed} of {total} failed, {total - decided} installing")]
    unhealthy = sum(d.unhealthy for d in on_new)
    out.append(_bound("unhealthy", kind, unhealthy / len(on_new) if on_new else None, g.max_unhealthy_rate,
                      len(on_new), bool(on_new)))
    fallen = [d.engine for d in on_new if d.engine is not None and engine_kind(d.engine) not in g.allowed_engines]
    reported = sum(d.engine is not None for d in on_new)
    out.append(GateResult("engine", kind, "fail" if fallen else "pass", float(len(fallen)), 0.0, reported,
                          f"fell back to {', '.join(sorted(set(fallen)))}; allowed: {', '.join(g.allowed_engines)}"
                          if fallen else f"allowed: {', '.join(g.allowed_engines)}"))
    return out


def evaluate(g: Gates, statuses: list[DeviceStatus], new: dict[str, Aggregate], baseline: dict[str, Aggregate],
             min_requests: float) -> list[GateResult]:
    """Every gate, per hardware kind present among the rollout's devices.

    The stage's `min_requests` is split between the kinds by their share of
    devices, so a kind with few canaries is judged as soon as its share is in.
    """
    kinds = sorted({d.hardware for d in statuses})
    out: list[GateResult] = []
    for kind in kinds:
        mine = [d for d in statuses if d.hardware == kind]
        share = len(mine) / len(statuses)
        out.extend(device_gates(g, kind, mine))
        out.extend(telemetry_gates(g, kind, new.get(kind, Aggregate()), baseline.get(kind, Aggregate()),
                                   max(1.0, min_requests * share)))
    return out
