"""The report schema both sides use: what the agent's builders make is what the fleet accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from contract import (
    Event,
    Health,
    ModelState,
    ModelStats,
    ReportInvalid,
    TelemetryWindow,
    build_report,
    validate_report,
)
from contract.report import EVENT_KINDS, SCHEMAS, STEPS, SYSTEM_METRICS

T = 1_800_000_000.0


def _full() -> dict[str, Any]:
    return build_report(
        agent_version="0.1.0", time=T,
        hardware={"cpu": "x86_64", "cpu_count": 8, "architecture": "x86_64", "memory_bytes": 8e9},
        runtime={"python": "3.11.7", "onnxruntime": "1.19.0", "tensorrt": None},
        bundles=[{"ref": "demo@2.0.0", "active": True, "engine": "ort-cpu"}, {"ref": "demo@1.0.0"}],
        models=[ModelState("demo", active="2.0.0", staged=None, last_known_good="1.0.0", backend="ort-cpu",
                           fallback_reasons=("tensorrt: no GPU",), health=Health("ok"),
                           stats=ModelStats(requests=10, errors=1, nan_count=2, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0))],
        health=Health("degraded", "demo v3 refused"),
        assignment={"serial": 7, "expires_at": T + 3600, "accepted_at": T - 5},
        events=[Event(T - 1, "install_refused", "warmup", "outputs not finite", ref="demo@3.0.0", serial=7),
                Event(T - 2, "assignment_rejected", "assignment", "expired", serial=8)],
        telemetry=[TelemetryWindow(T - 30, T, 10, 1, {"cpu_percent": 12.5, "memory_bytes": 1e8, "bogus": 1.0},
                                   {"demo": ModelStats(10, 1, 2, 1.0, 2.0, 3.0)})],
        reports_dropped=3)


def test_full_report_builds_validates_and_is_plain_json() -> None:
    r = _full()
    assert json.loads(json.dumps(r, allow_nan=False)) == r
    validate_report(r)
    assert r["models"][0] == {"name": "demo", "active": "2.0.0", "staged": None, "last_known_good": "1.0.0",
                              "backend": "ort-cpu", "fallback_reasons": ["tensorrt: no GPU"],
                              "health": {"status": "ok"},
                              "stats": {"requests": 10, "errors": 1, "nan_count": 2, "p50_ms": 1.0, "p95_ms": 2.0,
                                        "p99_ms": 3.0}}
    assert r["events"][0] == {"at": T - 1, "kind": "install_refused", "step": "warmup",
                              "reason": "outputs not finite", "ref": "demo@3.0.0", "serial": 7}
    window = r["telemetry"][0]
    assert "bogus" not in window and window["cpu_percent"] == 12.5 and window["models"]["demo"]["p99_ms"] == 3.0
    assert r["reports_dropped"] == 3


def test_minimal_report_is_valid() -> None:
    r = build_report(agent_version="0.1.0", time=T)
    assert r["health"] == {"status": "ok"} and "reports_dropped" not in r


def test_unmeasurable_numbers_are_left_out_not_sent() -> None:
    nan, inf = float("nan"), float("inf")
    r = build_report(agent_version="0.1.0", time=T, telemetry=[TelemetryWindow(
        T - 1, T, system={"cpu_percent": nan, "temperature_c": inf, "memory_bytes": 5.0},
        models={"m": ModelStats(1, 0, 0, p50_ms=nan, p99_ms=2.0)})])
    w = r["telemetry"][0]
    assert "cpu_percent" not in w and "temperature_c" not in w and w["memory_bytes"] == 5.0
    assert w["models"]["m"] == {"requests": 1, "errors": 0, "nan_count": 0, "p99_ms": 2.0}


BAD: list[tuple[str, Any, str]] = [
    ("not an object", [], "body"),
    ("unknown field", {"unknown": 1}, "body"),
    ("bad health", {"health": {"status": "splendid"}}, "health/status"),
    ("negative count", {"telemetry": [{"requests": -1}]}, "telemetry/0/requests"),
    ("ref without version", {"bundles": [{"ref": "no-at-sign"}]}, "bundles/0/ref"),
    ("NaN gauge", {"telemetry": [{"cpu_percent": float("nan")}]}, "body/telemetry/0/cpu_percent"),
    ("infinite time", {"time": float("inf")}, "time"),
    ("unknown event kind", {"events": [{"at": T, "kind": "party", "step": "switch", "reason": ""}]},
     "events/0/kind"),
    ("unknown step", {"events": [{"at": T, "kind": "installed", "step": "dance", "reason": ""}]}, "events/0/step"),
    ("event without reason", {"events": [{"at": T, "kind": "installed", "step": "switch"}]}, "events/0"),
    ("reason too long", {"events": [{"at": T, "kind": "installed", "step": "switch", "reason": "x" * 1001}]},
     "events/0/reason"),
    ("too many events", {"events": [{"at": T, "kind": "installed", "step": "switch", "reason": ""}] * 101},
     "events"),
    ("model without name", {"models": [{"active": "1"}]}, "models/0"),
    ("serial as a string", {"assignment": {"serial": "7"}}, "assignment/serial"),
    ("huge serial", {"assignment": {"serial": 2**63}}, "assignment/serial"),
    ("negative dropped count", {"reports_dropped": -1}, "reports_dropped"),
    ("runtime value a number", {"runtime": {"python": 3}}, "runtime/python"),
    ("too many telemetry windows", {"telemetry": [{}] * 101}, "telemetry"),
]


@pytest.mark.parametrize(("name", "report", "where"), BAD, ids=[b[0] for b in BAD])
def test_bad_reports_name_the_field(name: str, report: Any, where: str) -> None:
    with pytest.raises(ReportInvalid) as caught:
        validate_report(report)
    assert caught.value.where == where, caught.value


def test_builders_refuse_what_the_fleet_would_refuse() -> None:
    with pytest.raises(ReportInvalid, match="health/status"):
        build_report(agent_version="0.1.0", time=T, health=Health("splendid"))
    with pytest.raises(ReportInvalid, match="events/0/kind"):
        build_report(agent_version="0.1.0", time=T, events=[Event(T, "party", "switch", "")])


def test_schema_names_every_system_metric_step_and_kind() -> None:
    window = SCHEMAS["TelemetryWindow"]["properties"]
    assert set(SYSTEM_METRICS) <= set(window)
    event = SCHEMAS["Event"]["properties"]
    assert event["step"]["enum"] == list(STEPS) and event["kind"]["enum"] == list(EVENT_KINDS)
