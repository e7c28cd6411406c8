"""The report a device sends to ``POST /api/v1/devices/{id}/reports``: schema and typed builders.

One report is a heartbeat (versions, hardware, installed bundles, per-model
state, health, the assignment it runs, what went wrong since the last report)
plus zero or more telemetry windows (system metrics and per-model latency and
counts over a time span). The agent builds reports with `build_report`; the
fleet validates every body against `SCHEMAS["Report"]` (published in its
OpenAPI document), so neither side can drift from the other.

`SCHEMAS` is a set of JSON Schema components that refer to each other as
``#/components/schemas/NAME``, ready to merge into an OpenAPI document;
`validate_report` resolves them on its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from .errors import ReportInvalid

_NUM = {"type": "number", "minimum": 0, "maximum": 1e15}
_STR = {"type": "string", "maxLength": 200}
_TIME = {"type": "number", "minimum": 0, "maximum": 1e11}
_REF = "^[^@]{1,128}@[^@]{1,64}$"
_VERSION = {"type": ["string", "null"], "maxLength": 128}

#: System metrics of a telemetry window (all gauges except the two request counters).
SYSTEM_METRICS = ("cpu_percent", "memory_bytes", "memory_percent", "disk_free_bytes", "disk_percent",
                  "temperature_c", "gpu_util_percent", "gpu_memory_bytes")
#: Per-model counters and latency percentiles of a window.
MODEL_STATS = ("requests", "errors", "nan_count", "p50_ms", "p95_ms", "p99_ms")
#: The update steps a refusal or failure can name (issue 10's lifecycle).
STEPS = ("assignment", "preflight", "download", "verify", "install", "build", "warmup", "switch", "commit",
         "gc", "revert", "start")
EVENT_KINDS = ("assignment_rejected", "install_refused", "install_failed", "installed", "switched", "reverted",
               "revoked", "download_failed")
HEALTH = ("ok", "degraded", "failing")

SCHEMAS: dict[str, dict[str, Any]] = {
    "Hardware": {"type": "object", "maxProperties": 32, "properties": {
        "cpu": _STR, "cpu_count": {"type": "integer", "minimum": 0, "maximum": 4096}, "architecture": _STR,
        "memory_bytes": _NUM, "gpu_name": _STR, "compute_capability": _STR, "driver": _STR, "cuda": _STR,
        "tensorrt": _STR, "onnxruntime": _STR}, "additionalProperties": {"type": ["string", "number", "null"]}},
    "InstalledBundle": {"type": "object", "required": ["ref"], "additionalProperties": False, "properties": {
        "ref": {"type": "string", "pattern": _REF}, "active": {"type": "boolean"}, "engine": _STR,
        "fallback_reasons": {"type": "array", "maxItems": 16, "items": {"type": "string", "maxLength": 1000}}}},
    "Health": {"type": "object", "required": ["status"], "additionalProperties": False, "properties": {
        "status": {"enum": list(HEALTH)}, "detail": {"type": "string", "maxLength": 2000}}},
    "ModelStats": {"type": "object", "additionalProperties": False, "properties": {
        **{k: _NUM for k in MODEL_STATS},
        # the window's values of the custom metrics the bundle's manifest declares (service.metrics)
        "metrics": {"type": "object", "maxProperties": 16, "propertyNames": {"pattern": "^[a-z][a-z0-9_]{0,62}$"},
                    "additionalProperties": {"type": "number", "minimum": -1e15, "maximum": 1e15}}}},
    "ModelState": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 128},
        "active": _VERSION, "staged": _VERSION, "last_known_good": _VERSION,
        "backend": _STR,
        "fallback_reasons": {"type": "array", "maxItems": 16, "items": {"type": "string", "maxLength": 1000}},
        "health": {"$ref": "#/components/schemas/Health"},
        "stats": {"$ref": "#/components/schemas/ModelStats"}}},
    "Event": {"type": "object", "required": ["at", "kind", "step", "reason"], "additionalProperties": False,
              "properties": {
                  "at": _TIME, "kind": {"enum": list(EVENT_KINDS)}, "step": {"enum": list(STEPS)},
                  "reason": {"type": "string", "maxLength": 1000},
                  "ref": {"type": "string", "pattern": _REF},
                  "serial": {"type": "integer", "minimum": 0, "maximum": 2**62}}},
    "AssignmentInfo": {"type": "object", "required": ["serial"], "additionalProperties": False, "properties": {
        "serial": {"type": "integer", "minimum": 0, "maximum": 2**62}, "expires_at": _TIME, "accepted_at": _TIME}},
    "Runtime": {"type": "object", "maxProperties": 32, "propertyNames": {"maxLength": 64},
                "additionalProperties": {"type": ["string", "null"], "maxLength": 200}},
    "TelemetryWindow": {"type": "object", "additionalProperties": False, "properties": {
        "start": _TIME, "end": _TIME,
        **{k: _NUM for k in ("requests", "errors", *SYSTEM_METRICS) if k != "temperature_c"},
        "temperature_c": {"type": "number", "minimum": -100, "maximum": 300},
        "models": {"type": "object", "maxProperties": 32, "propertyNames": {"maxLength": 128},
                   "additionalProperties": {"$ref": "#/components/schemas/ModelStats"}}}},
    "Report": {"type": "object", "additionalProperties": False, "properties": {
        "agent_version": {"type": "string", "maxLength": 64},
        "time": _TIME,
        "hardware": {"$ref": "#/components/schemas/Hardware"},
        "runtime": {"$ref": "#/components/schemas/Runtime"},
        "bundles": {"type": "array", "maxItems": 64, "items": {"$ref": "#/components/schemas/InstalledBundle"}},
        "models": {"type": "array", "maxItems": 64, "items": {"$ref": "#/components/schemas/ModelState"}},
        "health": {"$ref": "#/components/schemas/Health"},
        "assignment": {"$ref": "#/components/schemas/AssignmentInfo"},
        "events": {"type": "array", "maxItems": 100, "items": {"$ref": "#/components/schemas/Event"}},
        "reports_dropped": {"type": "integer", "minimum": 0, "maximum": 2**62},
        "telemetry": {"type": "array", "maxItems": 100,
                      "items": {"$ref": "#/components/schemas/TelemetryWindow"}}}},
}
#: Heartbeat fields the fleet keeps as the device's latest state.
STATE_FIELDS = ("agent_version", "time", "hardware", "runtime", "bundles", "models", "health", "assignment",
                "events", "reports_dropped")


@functools.cache
def validator(name: str = "Report") -> Draft202012Validator:
    """Validator of one component, resolving its references among `SCHEMAS`."""
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": {"schemas": SCHEMAS}})


def validate_report(report: Any) -> None:
    """Raise `ReportInvalid` naming the first problem, else return."""
    error = best_match(validator().iter_errors(report))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "body"
        raise ReportInvalid(where, error.message[:300])
    _check_finite(report, "body")


def _check_finite(value: Any, where: str) -> None:
    """JSON has no NaN or Infinity, and a schema's bounds let NaN through (every comparison is false)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ReportInvalid(where, f"{value} is not a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}/{i}")


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _measured(d: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics that could be measured: a NaN latency or an infinite gauge is left out, not sent."""
    return {k: v for k, v in d.items() if v is not None and not (isinstance(v, float) and not math.isfinite(v))}


@dataclass(frozen=True)
class ModelStats:
    requests: int = 0
    errors: int = 0
    nan_count: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    #: custom metrics the bundle's manifest declares (service.metrics), read by the rollout gates
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = _measured({k: v for k, v in asdict(self).items() if k != "metrics"})
        custom = _measured(dict(self.metrics))
        if custom:
            out["metrics"] = custom
        return out


@dataclass(frozen=True)
class Health:
    status: str = "ok"
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return _drop_none(asdict(self))


@dataclass(frozen=True)
class ModelState:
    """One model name on the device: which versions sit where, and how it is served."""

    name: str
    active: str | None = None
    staged: str | None = None
    last_known_good: str | None = None
    backend: str | None = None
    fallback_reasons: tuple[str, ...] = ()
    health: Health | None = None
    stats: ModelStats | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "active": self.active, "staged": self.staged,
                               "last_known_good": self.last_known_good}
        if self.backend is not None:
            out["backend"] = self.backend
        if self.fallback_reasons:
            out["fallback_reasons"] = [r[:1000] for r in self.fallback_reasons[:16]]
        if self.health is not None:
            out["health"] = self.health.to_json()
        if self.stats is not None:
            out["stats"] = self.stats.to_json()
        return out


@dataclass(frozen=True)
class Event:
    """Something the fleet must hear about: a refused assignment or install, a switch, a revert."""

    at: float
    kind: str
    step: str
    reason: str
    ref: str | None = None
    serial: int | None = None

    def to_json(self) -> dict[str, Any]:
        return _drop_none({**asdict(self), "reason": self.reason[:1000]})


@dataclass(frozen=True)
class TelemetryWindow:
    start: float
    end: float
    requests: int = 0
    errors: int = 0
    system: Mapping[str, float] = field(default_factory=dict)
    models: Mapping[str, ModelStats] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"start": self.start, "end": self.end, "requests": self.requests,
                               "errors": self.errors}
        out.update(_measured({k: v for k, v in self.system.items() if k in SYSTEM_METRICS}))
        if self.models:
            out["models"] = {name: s.to_json() for name, s in self.models.items()}
        return out


def build_report(*, agent_version: str, time: float, hardware: Mapping[str, Any] | None = None,
                 runtime: Mapping[str, str | None] | None = None, bundles: Iterable[Mapping[str, Any]] = (),
                 models: Iterable[ModelState] = (), health: Health | None = None,
                 assignment: Mapping[str, Any] | None = None, events: Iterable[Event] = (),
                 telemetry: Iterable[TelemetryWindow] = (), reports_dropped: int = 0) -> dict[str, Any]:
    """A report as the fleet accepts it; raises `ReportInvalid` rather than build one it would refuse."""
    report: dict[str, Any] = {"agent_version": agent_version, "time": time,
                              "bundles": [dict(b) for b in bundles], "models": [m.to_json() for m in models],
                              "health": (health or Health()).to_json(),
                              "events": [e.to_json() for e in events][-100:],
                              "telemetry": [w.to_json() for w in telemetry][-100:]}
    if hardware is not None:
        report["hardware"] = dict(hardware)
    if runtime is not None:
        report["runtime"] = dict(runtime)
    if assignment is not None:
        report["assignment"] = dict(assignment)
    if reports_dropped:
        report["reports_dropped"] = reports_dropped
    validate_report(report)
    return report
