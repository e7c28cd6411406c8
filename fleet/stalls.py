"""Evidence of event-loop stalls: how late the loop runs a timer, and how long the garbage collector ran.

Every request of a fleet process shares one event loop, so anything that
holds it (a slow callback, a big decode, a full garbage collection) delays
every report and long-poll at once. This watch ticks every `tick_s`; a tick
that comes more than `warn_ms` late is logged with the collector's time over
the same interval, so a periodic stall names its cause in the log instead of
only showing up as a latency tail. Cheap enough to run always (one timer, one
gc callback).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class StallWatch:
    tick_s: float = 0.05
    warn_ms: float = 100.0
    #: Per generation, over the watch's life: collections run, their total and longest time (ms).
    gc_runs: dict[int, int] = field(default_factory=dict)
    gc_total_ms: dict[int, float] = field(default_factory=dict)
    gc_longest_ms: dict[int, float] = field(default_factory=dict)
    #: The worst lag (ms) in the current and the previous second: how far behind the loop runs now.
    recent_lag_ms: float = 0.0
    _second: tuple[int, float, float] = (0, 0.0, 0.0)  # (second, its max lag, the previous second's)
    _gc_started: float | None = None
    _gc_since_tick_ms: float = 0.0
    _gc_worst: tuple[float, int] = (0.0, -1)  # (ms, generation) of the longest collection since the tick

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            ms = (time.perf_counter() - self._gc_started) * 1000
            self._gc_started = None
            self._gc_since_tick_ms += ms
            gen = int(info.get("generation", -1))
            self._gc_worst = max(self._gc_worst, (ms, gen))
            self.gc_runs[gen] = self.gc_runs.get(gen, 0) + 1
            self.gc_total_ms[gen] = self.gc_total_ms.get(gen, 0.0) + ms
            self.gc_longest_ms[gen] = max(self.gc_longest_ms.get(gen, 0.0), ms)

    def _note(self, second: int, lag_ms: float) -> None:
        current, worst, previous = self._second
        if second != current:
            previous, worst = (worst if second == current + 1 else 0.0), 0.0
        worst = max(worst, lag_ms)
        self._second = (second, worst, previous)
        self.recent_lag_ms = max(worst, previous)

    def summary(self) -> str:
        return "; ".join(f"generation {g}: {self.gc_runs[g]} collections, {self.gc_total_ms[g]:.0f} ms in all, "
                         f"longest {self.gc_longest_ms[g]:.0f} ms" for g in sorted(self.gc_runs)) or "none"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        gc.callbacks.append(self._on_gc)
        try:
            expected = loop.time() + self.tick_s
            while True:
                await asyncio.sleep(self.tick_s)
                now = loop.time()
                lag_ms = max(0.0, (now - expected) * 1000)
                self._note(int(now), lag_ms)
                if lag_ms >= self.warn_ms:
                    worst_ms, gen = self._gc_worst
                    log.warning("event loop stalled %.0f ms (garbage collector: %.0f ms of it, longest %.0f ms "
                                "in generation %d)", lag_ms, self._gc_since_tick_ms, worst_ms, gen)
                self._gc_since_tick_ms = 0.0
                self._gc_worst = (0.0, -1)
                expected = now + self.tick_s
        finally:
            gc.callbacks.remove(self._on_gc)
            log.info("garbage collections while serving: %s", self.summary())
