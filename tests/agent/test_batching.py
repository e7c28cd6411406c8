"""The adaptive batcher over a real Runner: results go back to the right request, failures to every waiter.

No timing assertions: concurrency is made deterministic by one engine
instance (while it computes the first batch, the others queue up).
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

import bundle
from agent.batching import AdaptiveBatcher
from agent.errors import DeadlineExceeded, InferenceFailed, Overloaded, ValidationError
from agent.runner import Runner

MakeBatcher = Callable[..., AdaptiveBatcher]


@pytest.fixture
async def make_batcher(bundles: dict[str, pathlib.Path],
                       trust: list[bundle.TrustAnchor]) -> AsyncIterator[tuple[MakeBatcher, list[int]]]:
    made: list[AdaptiveBatcher] = []
    sizes: list[int] = []

    def make(model: str, *, max_batch_size: int = 8, max_queue: int = 64, delay_ms: float = 2.0,
             instances: int = 1, max_request_items: int | None = None) -> AdaptiveBatcher:
        runner = Runner.open(bundle.verify(bundles[model], trust), instances=instances)
        b = AdaptiveBatcher(runner, max_batch_size=max_batch_size, max_queue_delay_ms=delay_ms, max_queue=max_queue,
                            batchable=True, max_request_items=max_request_items, on_batch=sizes.append)
        made.append(b)
        return b

    yield make, sizes
    for b in made:
        await b.close()
        b.runner.close()


def _deadline(s: float = 30.0) -> float:
    return time.monotonic() + s


async def test_results_are_split_back_to_the_right_requests(make_batcher: Any, reference: Any) -> None:
    make, sizes = make_batcher
    b = make("mlp", max_batch_size=16)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1 + i % 4, 64)).astype(np.float32) for i in range(24)]
    results = await asyncio.gather(*(b.submit({"input": x}, _deadline()) for x in xs))
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_allclose(r.outputs["logits"], reference("mlp", {"input": x})["logits"], rtol=1e-5, atol=1e-6)
    assert max(sizes) > 4, sizes  # requests were merged (each alone is at most 4)
    assert max(sizes) <= 16 and sum(sizes) == sum(len(x) for x in xs)


async def test_a_request_larger_than_the_batch_is_split_and_one_too_large_is_refused(
        make_batcher: Any, reference: Any) -> None:
    make, sizes = make_batcher
    b = make("mlp", max_batch_size=8, max_request_items=32)
    x = np.random.default_rng(1).standard_normal((20, 64)).astype(np.float32)
    r = await b.submit({"input": x}, _deadline())
    np.testing.assert_allclose(r.outputs["logits"], reference("mlp", {"input": x})["logits"], rtol=1e-5, atol=1e-6)
    assert sizes and max(sizes) <= 8 and sum(sizes) == 20
    with pytest.raises(ValidationError, match="batch of 40 is over the 32 items"):
        await b.submit({"input": np.zeros((40, 64), np.float32)}, _deadline())


async def test_a_batch_failure_reaches_every_request_in_it(make_batcher: Any, reference: Any) -> None:
    make, _sizes = make_batcher
    b = make("lookup", max_batch_size=8)
    x = np.ones((1, 4), np.float32)
    first = asyncio.ensure_future(b.submit({"x": x, "idx": np.array([1])}, _deadline()))
    while b.busy_instances == 0:  # dispatched alone: the engine is busy with it
        await asyncio.sleep(0)
    idxs = [2, 3, 99, 4, 5]  # 99 is past the table: the merged batch fails in the runtime
    results = await asyncio.gather(*(b.submit({"x": x, "idx": np.array([i])}, _deadline()) for i in idxs),
                                   return_exceptions=True)
    np.testing.assert_array_equal((await first).outputs["y"], reference("lookup", {"x": x, "idx": np.array([1])})["y"])
    assert all(isinstance(r, InferenceFailed) for r in results), results
    for e in results:
        assert "batch of 5 requests failed" in str(e) and "lookup" in str(e) and "99" in str(e)
    # the batcher still serves after the failure
    r = await b.submit({"x": x, "idx": np.array([2])}, _deadline())
    np.testing.assert_array_equal(r.outputs["y"], reference("lookup", {"x": x, "idx": np.array([2])})["y"])


async def test_incompatible_shapes_are_never_merged(make_batcher: Any, reference: Any) -> None:
    make, _ = make_batcher
    b = make("dynamic_conv")
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((1, 3, 8 + 4 * (i % 3), 8)).astype(np.float32) for i in range(9)]
    results = await asyncio.gather(*(b.submit({"image": x}, _deadline()) for x in xs))
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_allclose(r.outputs["embedding"], reference("dynamic_conv", {"image": x})["embedding"],
                                   rtol=1e-5, atol=1e-6)


async def test_expired_and_cancelled_requests_never_reach_the_engine(make_batcher: Any) -> None:
    make, sizes = make_batcher
    b = make("cnn", max_batch_size=4)
    img = np.zeros((4, 3, 224, 224), np.float32)
    first = asyncio.ensure_future(b.submit({"image": img}, _deadline()))
    while b.busy_instances == 0:  # wait until first is dispatched: the engine is now busy
        await asyncio.sleep(0)
    late = asyncio.ensure_future(b.submit({"image": img[:1]}, time.monotonic() + 0.001))
    gone = asyncio.ensure_future(b.submit({"image": img[:2]}, _deadline()))
    await asyncio.sleep(0)
    assert b.queue_depth == 2
    gone.cancel()
    with pytest.raises(DeadlineExceeded):
        await late
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert b.queue_depth == 0
    await first
    assert sizes == [4]  # only the first batch ever ran


async def test_a_full_queue_refuses_at_once_with_retry_after(make_batcher: Any) -> None:
    make, _ = make_batcher
    b = make("cnn", max_batch_size=1, max_queue=2)
    img = np.zeros((1, 3, 224, 224), np.float32)
    running = [asyncio.ensure_future(b.submit({"image": img}, _deadline()))]
    while b.busy_instances == 0:
        await asyncio.sleep(0)
    running += [asyncio.ensure_future(b.submit({"image": img}, _deadline())) for _ in range(2)]
    while b.queue_depth < 2:
        await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await b.submit({"image": img}, _deadline())
    assert info.value.retry_after_s >= 1 and info.value.status == 503
    await asyncio.gather(*running)


async def test_a_model_that_runs_inline_skips_the_queue_and_its_queued_batches_run_in_the_dispatcher(
        bundles: dict[str, pathlib.Path], trust: list[bundle.TrustAnchor], reference: Any) -> None:
    runner = Runner.open(bundle.verify(bundles["mlp"], trust), inline_compute_ms=1000.0)
    where: list[tuple[str, int]] = []

    def on_batch(items: int) -> None:
        task = asyncio.current_task()
        where.append((task.get_name() if task is not None else "", items))

    b = AdaptiveBatcher(runner, max_batch_size=4, max_queue_delay_ms=2.0, max_queue=64, batchable=True,
                        on_batch=on_batch)
    try:
        x = np.random.default_rng(1).standard_normal((10, 64)).astype(np.float32)
        await b.submit({"input": x[:1]}, _deadline())  # engine time unknown: a thread, then known to be tiny
        assert runner.runs_inline
        where.clear()
        alone = await b.submit({"input": x[:1]}, _deadline())  # idle engine: on the spot, no queue
        assert alone.queue_s == 0.0 and where == [(asyncio.current_task().get_name(), 1)]  # type: ignore[union-attr]
        where.clear()
        split = await b.submit({"input": x}, _deadline())  # 10 items over batches of 4: queued parts
        np.testing.assert_allclose(split.outputs["logits"], reference("mlp", {"input": x})["logits"],
                                   rtol=1e-5, atol=1e-6)
        # each queued part ran inside the dispatcher task itself, not in a task of its own
        assert where == [("batcher-mlp", 4), ("batcher-mlp", 4), ("batcher-mlp", 2)], where
        assert b.busy_instances == 0 and b.queue_depth == 0
    finally:
        await b.close()
        runner.close()


async def test_one_deadline_timer_expires_each_queued_request_at_its_own_deadline(make_batcher: Any) -> None:
    """The batcher arms one timer for the earliest deadline; a request queued later with an earlier
    deadline still expires first, none before its own deadline, and a long one is served."""
    make, sizes = make_batcher
    b = make("cnn", max_batch_size=32)
    first = asyncio.ensure_future(b.submit({"image": np.zeros((32, 3, 224, 224), np.float32)}, _deadline()))
    while b.busy_instances == 0:  # 32 images keep the one engine busy for a good while: the rest queue
        await asyncio.sleep(0)
    img = np.zeros((1, 3, 224, 224), np.float32)
    t0 = time.monotonic()
    later = asyncio.ensure_future(b.submit({"image": img}, t0 + 0.08))
    sooner = asyncio.ensure_future(b.submit({"image": img}, t0 + 0.02))
    kept = asyncio.ensure_future(b.submit({"image": img}, _deadline()))
    done_at: dict[str, float] = {}
    for name, f in (("sooner", sooner), ("later", later)):
        f.add_done_callback(lambda _, n=name: done_at.__setitem__(n, time.monotonic()))
    with pytest.raises(DeadlineExceeded, match="while queued"):
        await sooner
    with pytest.raises(DeadlineExceeded, match="while queued"):
        await later
    assert not first.done()  # both expired from the queue, not by being reached
    assert done_at["sooner"] < done_at["later"]
    slack = 0.0015  # the loop's timers tick in milliseconds
    assert done_at["sooner"] >= t0 + 0.02 - slack and done_at["later"] >= t0 + 0.08 - slack
    await first
    assert (await kept).batch_size == 1
    assert sizes == [32, 1]  # the expired ones never reached the engine


async def test_a_deadline_that_passes_while_the_batch_computes_answers_at_once(make_batcher: Any) -> None:
    make, _ = make_batcher
    b = make("cnn", max_batch_size=32)
    late = asyncio.ensure_future(b.submit({"image": np.zeros((32, 3, 224, 224), np.float32)},
                                          time.monotonic() + 0.1))
    while b.busy_instances == 0:
        await asyncio.sleep(0)
    with pytest.raises(DeadlineExceeded, match="while computing"):
        await late
    assert b.busy_instances == 1  # answered before its batch finished
    while b.busy_instances:
        await asyncio.sleep(0.01)


async def test_answered_requests_do_not_pile_up_behind_the_deadline_timer(make_batcher: Any, reference: Any) -> None:
    make, _ = make_batcher
    b = make("mlp", max_batch_size=4)  # engine time unknown to a fresh runner: every batch queues
    x = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    for _ in range(25):
        results = await asyncio.gather(*[b.submit({"input": x[i:i + 1]}, _deadline()) for i in range(8)])
        got = np.concatenate([r.outputs["logits"] for r in results])
        np.testing.assert_allclose(got, reference("mlp", {"input": x})["logits"], rtol=1e-5, atol=1e-6)
    assert len(b._deadlines) <= 2 * 8 + 32  # 200 answered requests: their deadline entries were dropped
    assert b.queue_depth == 0
