"""How a serving fleet process uses Python's garbage collector.

Measured (bench/README.md, "Fleet"): with 2,000 devices a fleet process keeps
~120 tracked objects per device alive (each held long-poll is a task,
coroutines, futures, a timer, a request and its headers; each kept-alive report
connection its protocol and parser), 150-250k in all. They outlive a few young
collections, so they keep reaching the oldest generation, and CPython then runs
a full collection every few seconds (whenever the old generation grew by a
quarter). Each full collection walks every one of those objects with the GIL
held: 100-700 ms on a loaded 2-core machine, which every report and long-poll
answer of that moment waits out. Yet almost nothing it finds is garbage (the
request path makes no reference cycles: 10 cyclic objects in 6 s of 500
devices' traffic), because reference counting already frees it.

So: objects alive at start-up are frozen (never scanned), the young
generations keep CPython's thresholds (they hold only recent objects, so their
collections stay short; raising them was tried and made each middle-generation
collection walk ~100k objects, 150-250 ms), automatic full collections are
off, and the fleet runs a full collection itself at a fixed, long period, so
cyclic garbage (should a dependency make some) stays bounded. One stall of that
kind per period, not one every few seconds.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)

#: Full collections the fleet runs itself (automatic ones are off), seconds apart.
FULL_COLLECTION_INTERVAL_S = 600.0
#: A gen-2 threshold this high is never reached between our own full collections.
_NEVER = 1_000_000


def tune_for_serving() -> None:
    """Freeze what start-up built and turn automatic full collections off (see the module docstring)."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, _NEVER)


async def full_collections(interval_s: float = FULL_COLLECTION_INTERVAL_S) -> None:
    """Run the full collections that `tune_for_serving` took away from the interpreter."""
    while True:
        await asyncio.sleep(interval_s)
        started = time.perf_counter()
        found = gc.collect()
        log.info("full garbage collection: %d unreachable objects, %.0f ms",
                 found, (time.perf_counter() - started) * 1000)
