"""Remember recent requests so that a QoS 1 redelivery is never run twice.

MQTT QoS 1 is "at least once": after a reconnect a requester (or the broker)
may deliver the same request again. A request is identified by its reply
topic and correlation id; within the window a second copy is dropped, so
exactly one inference runs and exactly one reply goes out. Bounded by both
age and count, so a flood of distinct ids cannot grow memory. Used only on
the event loop thread, hence no lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

Key = tuple[str, bytes]


class DuplicateCache:
    def __init__(self, window_s: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[Key, float] = OrderedDict()
        self.duplicates = 0

    def first_time(self, key: Key) -> bool:
        """True the first time `key` is seen within the window (and records it)."""
        now = self._clock()
        self._expire(now)
        if key in self._seen:
            self.duplicates += 1
            return False
        self._seen[key] = now
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return True

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._seen:
            key, seen_at = next(iter(self._seen.items()))
            if seen_at > horizon:
                return
            del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)
