"""What a rollout is asked to do: target, stages and gates, resolved once at creation.

Gates default to the bundle's SLO (`service.slo` in the manifest) and its declared
custom metrics (`service.metrics`); the request may override any of them. The
resolved spec is stored with the rollout and never changes, so a restarted
fleet judges with exactly the thresholds the rollout started with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InvalidRequest

DEFAULT_STAGES: tuple[dict[str, Any], ...] = ({"devices": 1}, {"percent": 5}, {"percent": 25}, {"percent": 100})
ENGINES = ("tensorrt", "cuda", "cpu")
#: The agent reports the backend its runner uses (engines.registry.BACKENDS names, e.g. "ort-cuda");
#: gates and `allowed_engines` speak of engine kinds (the manifest's serving.engines), so map one to the other.
BACKEND_KINDS: dict[str, str] = {"tensorrt": "tensorrt", "ort-tensorrt": "tensorrt", "ort-cuda": "cuda",
                                 "ort-cpu": "cpu"}


def engine_kind(backend: str) -> str:
    """The kind of a reported backend (a kind name stays itself; an unknown name is judged as given)."""
    return BACKEND_KINDS.get(backend, backend)


@dataclass(frozen=True)
class Stage:
    """A slice of the target: a device count or a percentage, held for `soak_s` and `min_requests`."""

    devices: int | None = None
    percent: float | None = None
    soak_s: float = 600.0
    min_requests: int = 200

    def size(self, pool: int) -> int:
        """Devices this stage covers out of `pool` (at least 1 when the pool is not empty)."""
        if pool == 0:
            return 0
        if self.devices is not None:
            return min(pool, self.devices)
        assert self.percent is not None
        return max(1, min(pool, math.ceil(pool * self.percent / 100 - 1e-9)))

    @property
    def label(self) -> str:
        return f"{self.devices} device{'s' if self.devices != 1 else ''}" if self.devices is not None \
            else f"{self.percent:g}%"


@dataclass(frozen=True)
class MetricBound:
    name: str
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Gates:
    """Thresholds a stage must meet before it is promoted; any failure (past `failure_limit`) rolls back."""

    #: Absolute p95 bound (the SLO); None: no absolute bound.
    p95_ms: float | None = None
    #: p95 may be at most this many percent above the replaced version's on the same devices.
    max_p95_regression_pct: float | None = 20.0
    max_error_rate: float = 0.01
    max_nan_rate: float = 0.001
    #: Engines the new version may run on; a device that fell back to another fails the gate.
    allowed_engines: tuple[str, ...] = ENGINES
    #: Share of the stage's devices that did not install within `install_timeout_s`.
    max_install_failure_rate: float = 0.1
    install_timeout_s: float = 600.0
    #: Share of devices on the new version reporting health "failing".
    max_unhealthy_rate: float = 0.0
    #: Consecutive failing evaluations tolerated before the rollout halts (0: halt at the first).
    failure_limit: int = 1
    #: A stage that cannot be judged (not enough data) for this long pauses for an operator.
    inconclusive_deadline_s: float = 1800.0
    #: How far back the replaced version's telemetry is read for the baseline.
    baseline_window_s: float = 3600.0
    metrics: tuple[MetricBound, ...] = ()


@dataclass(frozen=True)
class Spec:
    bundle: str                                  # name@version
    labels: dict[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = ()                # explicit targets (instead of labels)
    stages: tuple[Stage, ...] = ()
    gates: Gates = field(default_factory=Gates)
    #: Models of the bundle whose telemetry the gates read (from the manifest).
    models: tuple[str, ...] = ()
    #: Label naming the hardware kind; else the reported GPU name or CPU architecture.
    hardware_label: str = "hardware"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spec:
        g = dict(d["gates"])
        g["allowed_engines"] = tuple(g["allowed_engines"])
        g["metrics"] = tuple(MetricBound(**m) for m in g["metrics"])
        return cls(bundle=d["bundle"], labels=dict(d["labels"]), devices=tuple(d["devices"]),
                   stages=tuple(Stage(**s) for s in d["stages"]), gates=Gates(**g), models=tuple(d["models"]),
                   hardware_label=d["hardware_label"])


def _stage(raw: dict[str, Any], soak_s: float, min_requests: int) -> Stage:
    devices, percent = raw.get("devices"), raw.get("percent")
    if (devices is None) == (percent is None):
        raise InvalidRequest("each stage needs exactly one of devices or percent")
    return Stage(devices=devices, percent=None if percent is None else float(percent),
                 soak_s=float(raw.get("soak_s", soak_s)), min_requests=int(raw.get("min_requests", min_requests)))


def resolve(body: dict[str, Any], manifest: dict[str, Any]) -> Spec:
    """Build the spec from a validated create request and the bundle's stored manifest."""
    selector = body.get("selector") or {}
    labels, devices = dict(selector.get("labels") or {}), tuple(selector.get("devices") or ())
    if labels and devices:
        raise InvalidRequest("selector: give labels or devices, not both")
    soak_s, min_requests = float(body.get("soak_s", 600.0)), int(body.get("min_requests", 200))
    stages = tuple(_stage(s, soak_s, min_requests) for s in (body.get("stages") or DEFAULT_STAGES))
    last = stages[-1]
    if not (last.percent == 100 or (devices and last.devices is not None and last.devices >= len(devices))):
        raise InvalidRequest("the last stage must cover the whole target (percent: 100)")
    service = manifest.get("service") or {}
    slo = service.get("slo") or {}
    declared = {m["name"]: m for m in service.get("metrics") or []}
    over = body.get("gates") or {}
    bounds = dict(declared)
    for name, b in (over.get("metrics") or {}).items():
        if name not in declared:
            raise InvalidRequest(f"gates.metrics.{name}: the bundle declares no such metric "
                                 f"(declared: {', '.join(sorted(declared)) or 'none'})")
        bounds[name] = {**declared[name], **b}
    engines = tuple(over.get("allowed_engines") or ENGINES)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise InvalidRequest(f"gates.allowed_engines: unknown engine {unknown[0]!r}; one of {', '.join(ENGINES)}")
    base = Gates()
    slo_nan = slo.get("max_nan_rate")
    gates = Gates(
        p95_ms=over.get("p95_ms", slo.get("p95_latency_ms")),
        max_p95_regression_pct=over.get("max_p95_regression_pct", base.max_p95_regression_pct),
        max_error_rate=float(over.get("max_error_rate", slo.get("max_error_rate", base.max_error_rate))),
        max_nan_rate=float(over.get("max_nan_rate", base.max_nan_rate if slo_nan is None else slo_nan)),
        allowed_engines=engines,
        **{k: type(getattr(base, k))(over[k]) for k in (
            "max_install_failure_rate", "install_timeout_s", "max_unhealthy_rate", "failure_limit",
            "inconclusive_deadline_s", "baseline_window_s") if k in over},
        metrics=tuple(MetricBound(n, b.get("min"), b.get("max")) for n, b in sorted(bounds.items())),
    )
    models = tuple(m["name"] for m in manifest.get("models") or [])
    return Spec(bundle=f"{manifest['name']}@{manifest['version']}", labels=labels, devices=devices, stages=stages,
                gates=gates, models=models, hardware_label=str(body.get("hardware_label", "hardware")))
