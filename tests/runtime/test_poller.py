"""The shared polling coordinator and loop runner."""

from __future__ import annotations

import asyncio
import logging

import pytest

from runtime import Backoff, LoopUnavailable, Poller, run_loop


def test_full_jitter_backoff_stays_under_its_cap() -> None:
    b = Backoff(base_s=0.5, max_s=4.0)
    assert b.delay_s(0, rand=lambda: 1.0) == 0.5
    assert b.delay_s(3, rand=lambda: 1.0) == 4.0
    assert b.delay_s(50, rand=lambda: 1.0) == 4.0
    assert b.delay_s(5, rand=lambda: 0.25) == 1.0


async def test_logs_only_state_changes_and_exposes_last_success_and_error(caplog: pytest.LogCaptureFixture) -> None:
    outcomes = iter([ConnectionError("down"), ConnectionError("down"), ConnectionError("still down"), None, None])

    async def poll() -> None:
        e = next(outcomes)
        if e is not None:
            raise e

    poller = Poller("test sync", poll, 0.0, backoff=Backoff(0.0, 0.0), logger=logging.getLogger("t"))
    with caplog.at_level(logging.WARNING, logger="t"):
        for _ in range(3):
            assert not await poller.run_once()
        assert poller.failing and poller.last_error == "still down" and poller.last_success is None
        assert poller.status().consecutive_failures == 3
        assert await poller.run_once() and await poller.run_once()
    assert not poller.failing and poller.last_error is None and poller.last_success is not None
    assert [r.getMessage() for r in caplog.records] == ["test sync failing: down",
                                                        "test sync recovered after 3 failed tries"]


async def test_a_bug_is_not_weather_and_wake_cuts_the_wait() -> None:
    calls = 0

    async def poll() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyError("bug")

    poller = Poller("p", poll, 3600.0, errors=(ConnectionError,))
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0.05)
    assert calls == 1  # waiting out the hour
    poller.wake()
    await asyncio.sleep(0.05)
    assert calls == 2
    poller.wake()
    with pytest.raises(KeyError):
        await asyncio.wait_for(task, 5)


def test_run_loop_names_a_missing_or_unknown_loop() -> None:
    async def answer() -> int:
        return 42

    assert run_loop(answer(), "asyncio") == 42
    with pytest.raises(LoopUnavailable, match="unknown event loop"):
        run_loop(answer(), "trio")
