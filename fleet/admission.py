"""Spreading a herd of devices over time instead of queueing it.

When a whole site boots at once (a power cut, a fleet restart) every device
makes first contact together: its credential, serial and assignment document
are not cached yet, so each costs database reads, and its first report joins
the writer's queue. Queued, the last of them wait many seconds, past their own
time-outs, and retry into the same queue. Instead, while more units of work are
open than the database has connections to run (`Database.in_flight` against
`capacity`, times `factor`), such cold requests are answered at once with 503
and a Retry-After drawn at random from [1, spread_s] seconds: the herd comes
back spread over a report period, and requests that need no database work
(cached credentials, held long-polls) are never refused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .db import Database
from .errors import Busy


@dataclass
class Admission:
    db: Database
    factor: float = 8.0
    spread_s: float = 10.0

    def retry_after_s(self) -> float:
        return random.uniform(1.0, self.spread_s)

    def admit_cold(self, what: str) -> None:
        """Raise Busy if the database is saturated; call before work no cache can answer."""
        if self.db.in_flight >= self.factor * self.db.capacity:
            raise Busy(self.retry_after_s(), what)
