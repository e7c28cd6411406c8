"""How an engine's time per item moves with the batch size, measured once per build.

Why: batching pays only where a bigger batch costs less per item. On a GPU it
does by a wide margin; on a small CPU it often does not: the ~1 GFLOP CNN on 2
cores takes 3.97 ms per item at batch 1, 3.84 at 2, 4.18 at 4 and 4.20 at 8, so
a server that waits to fill batches of 8 serves fewer images than one running
them one by one. The bundle's `max_batch_size` is its author's guess for every
device; this measurement lets each device cap it at what its engine shows.

Measured in the build's child process, where the engine already runs for the
parity check: a batch of 8 images grows ONNX Runtime's arena by ~170 MB, which
stays with the process that ran it, so the serving process must not be the one
to find out. The result is kept in the cache entry's build report and read on
every load (`EngineResult.batch_scaling`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from bundle import TensorSpec

from .base import Engine
from .errors import EngineError
from .shapes import ShapeProfile

#: largest batch tried (a profile may allow far more)
MAX_BATCH = 64
#: stop growing the batch once one call takes this long, or all calls together this long
CALL_BUDGET_S = 0.5
TOTAL_BUDGET_S = 3.0
#: calls per batch size: at least MIN_CALLS, and on until MIN_CALLS in a row have not improved on the
#: best by IMPROVED and MIN_SPENT_S has been spent; never over MAX_CALLS (or CALL_BUDGET_S)
MIN_CALLS = 5
IMPROVED = 0.98
MIN_SPENT_S = 0.02
MAX_CALLS = 500
#: a batch counts as good as the best one when its time per item is within this factor
TOLERANCE = 1.05


def measure(engine: Engine, inputs: Sequence[TensorSpec], profile: ShapeProfile,
            feeds: Mapping[str, np.ndarray]) -> dict[int, float] | None:
    """Seconds per item at batch 1, 2, 4, ... up to the profile's batch max (each the best of its calls, `_best_call`).

    `feeds` are inputs the engine is known to accept (the parity check's); their first
    item is repeated to each batch size. A model with no batch dim, or one that allows
    only batch 1, gets its time for one call of `feeds` alone, under 1: the instance
    policy reads how compute-bound a model is from it (`agent.instances`).
    """
    batch_name = next((n for n, r in profile.dims if r.batch), None)
    top = min(profile.range(batch_name).max, MAX_BATCH) if batch_name is not None else 1
    batched = [s.name for s in inputs if s.shape and s.shape[0] == batch_name]
    if top < 2 or not batched:
        try:
            return {1: _best_call(engine, feeds)}
        except EngineError:
            return None
    one = {k: (v[:1] if k in batched else v) for k, v in feeds.items()}
    per_item: dict[int, float] = {}
    started = time.perf_counter()
    batch = 1
    while batch <= top:
        arrays = {k: (np.repeat(v, batch, axis=0) if k in batched else v) for k, v in one.items()}
        try:
            best = _best_call(engine, arrays)
        except EngineError:
            break  # the engine's own limit (a TensorRT profile, memory): what was measured stands
        per_item[batch] = best / batch
        if best > CALL_BUDGET_S or time.perf_counter() - started > TOTAL_BUDGET_S:
            break
        batch *= 2
    return per_item or None


def _best_call(engine: Engine, feeds: Mapping[str, np.ndarray]) -> float:
    """The fastest call, once `MIN_CALLS` calls in a row have not beaten it (by `IMPROVED`) and
    `MIN_SPENT_S` has been spent, within `CALL_BUDGET_S` and `MAX_CALLS`.

    A tiny model's call takes microseconds: a fixed five of them can all land in one
    busy stretch of a shared machine, and a batch of 8 that measured slower than 4 that
    way capped an MLP at 4 in CI. Calling on until the minimum stops moving lets it show.
    """
    engine.infer(feeds)  # the first call at a new size pays for allocations
    best = float("inf")
    spent = 0.0
    calls = since_best = 0
    while calls < MAX_CALLS and spent <= CALL_BUDGET_S and (
            calls < MIN_CALLS or since_best < MIN_CALLS or spent < MIN_SPENT_S):
        t0 = time.perf_counter()
        engine.infer(feeds)
        dt = time.perf_counter() - t0
        since_best = 0 if dt < best * IMPROVED else since_best + 1
        best = min(best, dt)
        spent += dt
        calls += 1
    return best


def worthwhile_batch(per_item: Mapping[int, float] | None, configured: int) -> int:
    """The largest batch worth waiting for: the smallest one within `TOLERANCE` of the best time
    per item among those up to `configured`; `configured` itself when nothing was measured."""
    if not per_item:
        return configured
    allowed = {b: s for b, s in per_item.items() if b <= configured}
    if len(allowed) < 2:
        return configured
    best = min(allowed.values())
    if configured > max(allowed) and allowed[max(allowed)] == best:
        return configured  # still gaining at the largest batch measured: bigger ones may too
    return min(b for b, s in allowed.items() if s <= best * TOLERANCE)
