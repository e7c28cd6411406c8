"""The rollout state machine: pure decisions, no I/O.

States and transitions::

    running --promote--> running (next stage) ... --complete--> succeeded
    running --hold--> running            (not enough data, soak not over, a gate failing within its limit)
    running --halt--> rolled_back        (a gate failed past its limit: every device back to its old version)
    running --pause (inconclusive too long)--> paused
    operator: pause (running->paused), resume (paused->running), promote (next stage now),
              abort (running|paused->aborted, with rollback)

`decide` is called with the gate results of one evaluation; the caller (the
engine) persists what it returns with a compare-and-swap, so a decision made
on a state that changed meanwhile (an operator paused) is dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import Conflict
from .gates import GateResult
from .spec import Spec

ACTIVE = ("running", "paused")
FINAL = ("succeeded", "rolled_back", "aborted")
#: Final states whose devices go back to the version they ran before.
ROLLED_BACK = ("rolled_back", "aborted")

DecisionKind = Literal["promote", "complete", "hold", "halt", "pause"]
Action = Literal["pause", "resume", "abort", "promote"]


@dataclass(frozen=True)
class State:
    status: str
    stage: int
    stage_started_at: float
    failed_evaluations: int
    #: When the stage first could not be judged in a row (None: it could, last time).
    inconclusive_since: float | None = None


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    reason: str
    failed_evaluations: int
    inconclusive_since: float | None = None

    @property
    def changes_stage(self) -> bool:
        return self.kind in ("promote", "complete", "halt", "pause")


def _summary(results: Sequence[GateResult]) -> str:
    return "; ".join(f"{r.gate}[{r.hardware}] {_fmt(r.value)} > {_fmt(r.threshold)}" if r.verdict == "fail"
                     else f"{r.gate}[{r.hardware}] {r.note}" for r in results)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def decide(spec: Spec, state: State, results: Sequence[GateResult], now: float) -> Decision:
    """The next step of a running rollout from one evaluation of its gates."""
    assert state.status == "running"
    g = spec.gates
    stage = spec.stages[state.stage]
    failing = [r for r in results if r.verdict == "fail"]
    if failing:
        count = state.failed_evaluations + 1
        if count > g.failure_limit:
            return Decision("halt", f"gates failed: {_summary(failing)}", count)
        return Decision("hold", f"gates failing ({count} of {g.failure_limit} tolerated): {_summary(failing)}",
                        count, state.inconclusive_since)
    waiting = [r for r in results if r.verdict == "inconclusive"]
    soak_left = stage.soak_s - (now - state.stage_started_at)
    if waiting:
        since = state.inconclusive_since if state.inconclusive_since is not None else now
        if now - since >= g.inconclusive_deadline_s:
            return Decision("pause", f"no verdict for {now - since:.0f} s: {_summary(waiting)}", 0, since)
        return Decision("hold", f"not enough data: {_summary(waiting)}", 0, since)
    if soak_left > 0:
        return Decision("hold", f"soaking: {soak_left:.0f} s left in stage {state.stage + 1}", 0)
    if state.stage + 1 >= len(spec.stages):
        return Decision("complete", f"every stage passed; {stage.label} of the target runs {spec.bundle}", 0)
    return Decision("promote", f"stage {state.stage + 1} ({stage.label}) passed every gate", 0)


@dataclass(frozen=True)
class Transition:
    status: str
    stage: int
    event: str
    reason: str


def act(state: State, action: Action, stages: int) -> Transition:
    """An operator's action; Conflict when it makes no sense in this state."""
    if state.status not in ACTIVE:
        raise Conflict(f"the rollout is {state.status}; nothing to {action}")
    if action == "pause":
        if state.status == "paused":
            raise Conflict("the rollout is already paused")
        return Transition("paused", state.stage, "paused", "paused by an operator")
    if action == "resume":
        if state.status == "running":
            raise Conflict("the rollout is not paused")
        return Transition("running", state.stage, "resumed", "resumed by an operator")
    if action == "abort":
        return Transition("aborted", state.stage, "aborted", "aborted by an operator; rolling back")
    if state.stage + 1 >= stages:
        return Transition("succeeded", state.stage, "completed", "promoted to completion by an operator")
    return Transition("running", state.stage + 1, "promoted", "promoted by an operator (gates skipped)")


def _order(seed: str, device_id: str) -> str:
    return hashlib.sha256(f"{seed}:{device_id}".encode()).hexdigest()


def plan(pool: Sequence[tuple[str, str]], taken: set[str], size: int, seed: str) -> list[str]:
    """Devices to add so that `size` of `pool` ((device id, hardware kind)) are in.

    Canaries are spread across hardware kinds: kinds take turns (the kind with
    the most devices first), and within a kind the order is a hash of the
    rollout and device ids, stable across restarts yet different per rollout.
    """
    by_kind: dict[str, list[str]] = {}
    for device_id, kind in pool:
        by_kind.setdefault(kind, []).append(device_id)
    queues = [sorted(ids, key=lambda d: _order(seed, d))
              for _, ids in sorted(by_kind.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    interleaved: list[str] = []
    for i in range(max((len(q) for q in queues), default=0)):
        interleaved.extend(q[i] for q in queues if i < len(q))
    have = sum(1 for d, _ in pool if d in taken)
    want = max(0, size - have)
    return [d for d in interleaved if d not in taken][:want]
