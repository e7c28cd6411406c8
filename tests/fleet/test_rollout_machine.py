"""The rollout machine, gates and spec as pure functions: every decision from figures alone."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from fleet.errors import Conflict, InvalidRequest
from fleet.rollouts import machine
from fleet.rollouts.gates import Aggregate, DeviceStatus, evaluate
from fleet.rollouts.spec import Gates, MetricBound, Spec, Stage, resolve

MANIFEST: dict[str, Any] = {
    "name": "demo", "version": "2.0.0", "models": [{"name": "mlp"}],
    "service": {"owner": "o", "description": "d", "slo": {"p95_latency_ms": 20.0, "max_error_rate": 0.02},
                "metrics": [{"name": "defects_found", "min": 0.1}]},
}


def _spec(**gates: Any) -> Spec:
    return Spec(bundle="demo@2.0.0", stages=(Stage(devices=1, soak_s=60, min_requests=100),
                                             Stage(percent=100, soak_s=60, min_requests=100)),
                gates=Gates(p95_ms=20.0, **gates), models=("mlp",))


def _agg(requests: float, p95: float, errors: float = 0, nan: float = 0, **metrics: float) -> Aggregate:
    return Aggregate(requests=requests, errors=errors, nan_count=nan, p95_weighted=p95 * requests, p95_max=p95,
                     devices=1, metrics={k: v * requests for k, v in metrics.items()})


def _ok(kind: str = "t4", engine: str = "tensorrt") -> DeviceStatus:
    return DeviceStatus(kind, converged=True, install_failed=False, unhealthy=False, engine=engine)


def test_stage_sizes_round_up_and_never_exceed_the_pool() -> None:
    assert [Stage(percent=p).size(200) for p in (5, 25, 100)] == [10, 50, 200]
    assert Stage(percent=5).size(7) == 1 and Stage(percent=0.1).size(3) == 1 and Stage(percent=5).size(0) == 0
    assert Stage(devices=1).size(200) == 1 and Stage(devices=50).size(20) == 20


def test_plan_spreads_canaries_across_hardware_kinds_and_is_stable() -> None:
    pool = [(f"t{i}", "t4") for i in range(12)] + [(f"o{i}", "orin") for i in range(8)]
    first = machine.plan(pool, set(), 1, "r1")
    assert len(first) == 1 and first[0].startswith("t")       # the larger kind goes first
    second = machine.plan(pool, set(first), 4, "r1")
    assert Counter(d[0] for d in first + second) == Counter({"t": 2, "o": 2})
    assert machine.plan(pool, set(first), 4, "r1") == second   # same rollout, same order (restart-safe)
    assert machine.plan(pool, set(), 4, "r2") != machine.plan(pool, set(), 4, "r1")  # another rollout: others
    everything = machine.plan(pool, set(first + second), 20, "r1")
    assert sorted(first + second + everything) == sorted(d for d, _ in pool)
    assert machine.plan(pool, {d for d, _ in pool}, 20, "r1") == []


def test_gates_per_hardware_kind_with_values_and_thresholds() -> None:
    g = _spec().gates
    statuses = [_ok("t4"), _ok("orin")]
    results = evaluate(g, statuses, {"t4": _agg(100, 8), "orin": _agg(100, 60)},
                       {"t4": _agg(100, 8), "orin": _agg(100, 8)}, 100)
    failing = {(r.gate, r.hardware) for r in results if r.verdict == "fail"}
    assert failing == {("p95_ms", "orin"), ("p95_regression", "orin")}
    p95 = next(r for r in results if r.gate == "p95_ms" and r.hardware == "orin")
    assert (p95.value, p95.threshold, p95.n) == (60, 20, 100)
    reg = next(r for r in results if r.gate == "p95_regression" and r.hardware == "t4")
    assert reg.verdict == "pass" and reg.threshold == pytest.approx(8 * 1.2)


def test_not_enough_data_is_inconclusive_never_a_pass() -> None:
    g = _spec().gates
    results = evaluate(g, [_ok()], {"t4": _agg(10, 8)}, {}, 100)
    assert {r.verdict for r in results if r.gate in ("p95_ms", "error_rate", "nan_rate")} == {"inconclusive"}
    results = evaluate(g, [_ok()], {}, {}, 100)
    assert next(r for r in results if r.gate == "p95_ms").verdict == "inconclusive"


def test_error_nan_custom_metric_engine_health_and_install_gates() -> None:
    g = _spec(allowed_engines=("tensorrt", "cuda"), metrics=(MetricBound("defects_found", min=0.1),)).gates
    statuses = [_ok(), _ok(engine="cpu"), DeviceStatus("t4", False, True, False),
                DeviceStatus("t4", True, False, True, "tensorrt")]
    results = {r.gate: r for r in evaluate(g, statuses, {"t4": _agg(1000, 5, errors=20, nan=2, defects_found=0.05)},
                                           {}, 100)}
    assert results["error_rate"].verdict == "fail" and results["error_rate"].value == pytest.approx(0.02)
    assert results["nan_rate"].verdict == "fail" and results["nan_rate"].value == pytest.approx(0.002)
    assert results["metric:defects_found>="].verdict == "fail"
    assert results["metric:defects_found>="].value == pytest.approx(0.05)
    assert results["engine"].verdict == "fail" and "cpu" in results["engine"].note
    assert results["unhealthy"].verdict == "fail" and results["unhealthy"].value == pytest.approx(1 / 3)
    assert results["install_failures"].verdict == "fail" and results["install_failures"].value == 0.25


def test_decide_promotes_holds_halts_pauses_and_completes() -> None:
    spec = _spec(failure_limit=1, inconclusive_deadline_s=300)
    passing = evaluate(spec.gates, [_ok()], {"t4": _agg(200, 8)}, {}, 100)
    failing = evaluate(spec.gates, [_ok()], {"t4": _agg(200, 80)}, {}, 100)
    waiting = evaluate(spec.gates, [_ok()], {"t4": _agg(20, 8)}, {}, 100)
    s = machine.State("running", 0, 1000.0, 0)
    assert machine.decide(spec, s, passing, 1030).kind == "hold"      # soaking
    assert machine.decide(spec, s, passing, 1061).kind == "promote"
    d = machine.decide(spec, s, failing, 1061)
    assert (d.kind, d.failed_evaluations) == ("hold", 1) and "p95_ms[t4] 80 > 20" in d.reason
    d = machine.decide(spec, machine.State("running", 0, 1000.0, 1), failing, 1062)
    assert d.kind == "halt" and d.changes_stage
    d = machine.decide(spec, s, waiting, 1100)
    assert d.kind == "hold" and d.inconclusive_since == 1100 and "not enough data" in d.reason
    d = machine.decide(spec, machine.State("running", 0, 1000.0, 0, 1100), waiting, 1401)
    assert d.kind == "pause"
    assert machine.decide(spec, machine.State("running", 1, 1000.0, 0), passing, 1061).kind == "complete"
    # a passing evaluation after a failing one resets the count
    assert machine.decide(spec, machine.State("running", 0, 1000.0, 1), passing, 1061).failed_evaluations == 0


def test_operator_actions() -> None:
    running = machine.State("running", 0, 0.0, 0)
    paused = machine.State("paused", 0, 0.0, 0)
    assert machine.act(running, "pause", 2).status == "paused"
    assert machine.act(paused, "resume", 2).status == "running"
    assert (machine.act(paused, "promote", 2).status, machine.act(paused, "promote", 2).stage) == ("running", 1)
    assert machine.act(machine.State("running", 1, 0.0, 0), "promote", 2).status == "succeeded"
    assert machine.act(running, "abort", 2).status == "aborted"
    for state, action in ((paused, "pause"), (running, "resume"), (machine.State("aborted", 0, 0.0, 0), "abort"),
                          (machine.State("succeeded", 0, 0.0, 0), "pause")):
        with pytest.raises(Conflict):
            machine.act(state, action, 2)  # type: ignore[arg-type]


def test_spec_takes_gates_from_the_bundle_slo_unless_overridden() -> None:
    spec = resolve({"bundle": "demo@2.0.0"}, MANIFEST)
    assert [s.label for s in spec.stages] == ["1 device", "5%", "25%", "100%"]
    assert (spec.gates.p95_ms, spec.gates.max_error_rate, spec.gates.max_nan_rate) == (20.0, 0.02, 0.001)
    assert [(m.name, m.min, m.max) for m in spec.gates.metrics] == [("defects_found", 0.1, None)]
    assert spec.models == ("mlp",)
    over = resolve({"bundle": "demo@2.0.0", "gates": {"p95_ms": 15, "metrics": {"defects_found": {"max": 0.9}}},
                    "stages": [{"percent": 50, "soak_s": 5}, {"percent": 100}], "soak_s": 1}, MANIFEST)
    assert over.gates.p95_ms == 15 and over.gates.metrics[0].max == 0.9 and over.gates.metrics[0].min == 0.1
    assert [s.soak_s for s in over.stages] == [5, 1]
    assert Spec.from_dict(over.to_dict()) == over
    for bad, words in (({"gates": {"metrics": {"revenue": {"max": 1}}}}, "declares no such metric"),
                       ({"stages": [{"percent": 50}]}, "whole target"),
                       ({"stages": [{"percent": 50, "devices": 2}, {"percent": 100}]}, "exactly one"),
                       ({"gates": {"allowed_engines": ["openvino"]}}, "unknown engine"),
                       ({"selector": {"labels": {"a": "b"}, "devices": ["x"]}}, "not both")):
        with pytest.raises(InvalidRequest, match=words):
            resolve({"bundle": "demo@2.0.0", **bad}, MANIFEST)
