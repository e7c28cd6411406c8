"""Fault-injection points for the crash tests, inert unless `OUTPOST_AGENT_FAULTS` is set.

`OUTPOST_AGENT_FAULTS="load:demo@2.0.0=kill"` makes the agent SIGKILL itself
just before it loads that bundle version at start: a stand-in for a model
that takes the runtime down (a segfault in a custom op, an OOM kill), which is
what the crash-loop revert exists for. Points: `load:<ref>`; action: `kill`.
Nothing else reads the variable, and an unknown point or action is ignored.
"""

from __future__ import annotations

import os
import signal

ENV = "OUTPOST_AGENT_FAULTS"


def _armed(point: str) -> str | None:
    for item in os.environ.get(ENV, "").split(","):
        name, _, action = item.strip().partition("=")
        if name == point:
            return action
    return None


def reached(point: str) -> None:
    if _armed(point) == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
