"""A deadline never loses a cancellation (runtime.timeouts; CPython gh-86296 before 3.12)."""

from __future__ import annotations

import asyncio

import pytest

from runtime.timeouts import timeout


async def _quick() -> int:
    await asyncio.sleep(0)
    return 1


@pytest.mark.parametrize("yields", range(8))
async def test_a_cancel_that_arrives_as_the_awaited_work_completes_stops_the_loop(yields: int) -> None:
    """Python 3.11's `asyncio.wait_for` returned the result here and the loop ran on for ever (on this
    machine, 20 of 20 tries at 3 yields); a reporter loop built that way hung a test 120 s in CI."""
    rounds = 0

    async def until_cancelled() -> None:
        nonlocal rounds
        while True:
            async with timeout(5):
                await _quick()
            rounds += 1

    task = asyncio.create_task(until_cancelled())
    for _ in range(yields):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    if not done:
        task.cancel()
    assert task in done and task.cancelled(), f"the cancel was lost after {rounds} rounds"


async def test_the_deadline_raises_the_timeout_callers_catch() -> None:
    with pytest.raises(asyncio.TimeoutError):
        async with timeout(0.01):
            await asyncio.Event().wait()
    async with timeout(None):  # no deadline
        assert await _quick() == 1
