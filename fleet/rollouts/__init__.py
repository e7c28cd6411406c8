"""Staged rollouts gated on what devices measure: a pure machine (`machine`, `gates`, `spec`)
with its persistence (`store`), the engine that runs it (`engine`), and its HTTP API (`api`)."""

from .engine import RolloutEngine
from .machine import ACTIVE, FINAL, Decision, State, decide, plan
from .spec import Gates, Spec, Stage, resolve
from .store import RolloutStore, view

__all__ = ["ACTIVE", "FINAL", "Decision", "Gates", "RolloutEngine", "RolloutStore", "Spec", "Stage", "State",
           "decide", "plan", "resolve", "view"]
