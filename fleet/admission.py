"""Spreading a herd of devices over time instead of queueing it.

When a whole site boots at once (a power cut, a fleet restart) every device
makes first contact together: its credential, serial and assignment document
are not cached yet, so each costs database reads, and its first report joins
the writer's queue. Queued, the last of them wait many seconds, past their own
time-outs, and retry into the same queue. Instead, while the fleet is
saturated, such cold requests are answered at once with 503 and a Retry-After
drawn at random from [1, spread_s] seconds: the herd comes back spread over a
report period, and requests that need no database work (cached credentials,
held long-polls) are never refused. Saturated means either of what the
benchmark showed queueing: more units of database work open than
`max_in_flight` (SQLite runs 5 at once, PostgreSQL 20; the rest wait for a
connection), or, while more than `herd_per_s` cold requests arrive within a second,
the event loop running more than `max_lag_ms` behind its timers in the last
second or two (`fleet.stalls`), which on PostgreSQL was the bottleneck while
its connections were free. A lagging loop alone (one slow moment, a handful
of new devices) never refuses anyone.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field

from .db import Database
from .errors import Busy
from .stalls import StallWatch


@dataclass
class Admission:
    db: Database
    loop: StallWatch | None = None
    max_in_flight: int = 40
    max_lag_ms: float = 100.0
    herd_per_s: int = 20
    spread_s: float = 10.0
    #: arrival times of the latest `herd_per_s` cold requests: a sliding second, so a herd that
    #: straddles a clock second is still seen as one (counting per calendar second halved it)
    _cold: deque[float] = field(default_factory=deque)

    def retry_after_s(self) -> float:
        return random.uniform(1.0, self.spread_s)

    def admit_cold(self, what: str) -> None:
        """Raise Busy if the fleet is saturated; call before work no cache can answer."""
        now = time.monotonic()
        cold, n = self._cold, self.herd_per_s
        herd = n <= 0 or (len(cold) >= n and now - cold[-n] < 1.0)
        cold.append(now)
        while len(cold) > max(1, n):
            cold.popleft()
        if self.db.in_flight >= self.max_in_flight:
            raise Busy(self.retry_after_s(), what)
        if herd and self.loop is not None and self.loop.recent_lag_ms >= self.max_lag_ms:
            raise Busy(self.retry_after_s(), what)
