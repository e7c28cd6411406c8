"""Reconnect delays: exponential, capped, with full jitter.

paho's own reconnect delay doubles without jitter, so every device of a
fleet that lost the same broker would come back in lockstep and hammer it.
Each delay here is drawn uniformly from [min, current cap] ("full jitter"),
and the cap doubles up to `max_s`; a successful connection resets it.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    def __init__(self, min_s: float, max_s: float,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self._uniform = uniform
        self.attempt = 0

    def next_delay_s(self) -> float:
        cap = min(self.max_s, self.min_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self._uniform(self.min_s, cap)

    def reset(self) -> None:
        self.attempt = 0
