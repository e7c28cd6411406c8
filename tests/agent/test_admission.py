"""The byte budget on its own: FIFO grants, timeouts, cancellation and the no-wait fast path (agent.admission)."""

from __future__ import annotations

import asyncio

import pytest

from agent.admission import ByteBudget, Reservation
from agent.errors import Unavailable


def test_a_request_that_fits_needs_no_event_loop() -> None:
    """The fast path makes no future, task or timer: it runs with no loop at all."""
    budget = ByteBudget(100)
    with budget.reservation() as held:
        assert held.try_ensure(60)
        held.ensure(80)  # growth into free room
        assert budget.in_flight == 80
        other = budget.reservation()
        assert not other.try_ensure(30) and other.held == 0
        with pytest.raises(Unavailable, match="100-byte memory budget"):
            other.ensure(30)
    assert budget.in_flight == 0 and budget.refused == 1 and budget.waited == 0


async def _wait(budget: ByteBudget, n: int, wait_s: float, order: list[int]) -> Reservation:
    held = budget.reservation()
    await held.wait(n, wait_s)
    order.append(n)
    return held


async def test_waiters_are_granted_in_arrival_order_while_they_fit() -> None:
    budget = ByteBudget(100)
    blocker = budget.reservation()
    assert blocker.try_ensure(90)
    order: list[int] = []
    big = asyncio.ensure_future(_wait(budget, 80, 10, order))
    await asyncio.sleep(0)
    small = [asyncio.ensure_future(_wait(budget, 10, 10, order)) for _ in range(3)]
    await asyncio.sleep(0.01)
    # 10 bytes are free and each small one would fit, but the big one came first
    assert budget.waiting == 4 and budget.in_flight == 90 and order == []
    assert not budget.reservation().try_ensure(5)  # a newcomer queues behind them too
    blocker.release()
    await asyncio.sleep(0.01)
    assert order == [80, 10, 10] and budget.in_flight == 100 and budget.waiting == 1  # the third does not fit
    (await big).release()
    await asyncio.sleep(0.01)
    assert order == [80, 10, 10, 10] and budget.waiting == 0
    for t in small:
        (await t).release()
    assert budget.in_flight == 0 and budget.refused == 0 and budget.waited == 4


async def test_a_waiter_that_times_out_is_refused_and_unblocks_those_behind_it() -> None:
    budget = ByteBudget(100)
    blocker = budget.reservation()
    assert blocker.try_ensure(50)
    order: list[int] = []
    big = asyncio.ensure_future(_wait(budget, 80, 0.05, order))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(_wait(budget, 40, 10, order))  # fits in the free 50, but queued behind big
    await asyncio.sleep(0.01)
    assert budget.waiting == 2 and order == []
    with pytest.raises(Unavailable, match=r"after waiting 0\.05 s"):
        await big
    (await small).release()  # the head left: the one behind it fitted at once
    assert order == [40] and budget.waiting == 0
    blocker.release()
    assert budget.in_flight == 0 and budget.refused == budget.refused_after_wait == 1


async def test_a_cancelled_waiter_leaves_the_queue_and_a_granted_one_returns_its_bytes() -> None:
    budget = ByteBudget(100)
    blocker = budget.reservation()
    assert blocker.try_ensure(100)
    gone, late = budget.reservation(), budget.reservation()
    waiting = asyncio.ensure_future(gone.wait(60, 10))
    granted = asyncio.ensure_future(late.wait(30, 10))
    await asyncio.sleep(0.01)
    waiting.cancel()  # its client went away
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert budget.waiting == 1 and gone.held == 0
    # granted and cancelled in the same turn of the loop: the bytes are its reservation's, returned on release
    blocker.release()
    granted.cancel()
    with pytest.raises(asyncio.CancelledError):
        await granted
    assert late.held == 30 and budget.in_flight == 30
    late.release()
    assert budget.in_flight == 0 and budget.waiting == 0 and budget.refused == 0


async def test_a_cancelled_head_is_skipped_when_room_comes_in_the_same_turn() -> None:
    budget = ByteBudget(100)
    blocker = budget.reservation()
    assert blocker.try_ensure(100)
    first, second = budget.reservation(), budget.reservation()
    a = asyncio.ensure_future(first.wait(60, 10))
    b = asyncio.ensure_future(second.wait(60, 10))
    await asyncio.sleep(0.01)
    a.cancel()  # its future is cancelled now, its task leaves the queue only when it next runs
    blocker.release()  # ...so the grant must pass over it
    with pytest.raises(asyncio.CancelledError):
        await a
    await b
    assert first.held == 0 and second.held == 60 and budget.in_flight == 60
    second.release()
    assert budget.in_flight == 0


async def test_only_an_empty_reservation_may_wait_and_no_wait_means_refused_at_once() -> None:
    budget = ByteBudget(100)
    held = budget.reservation()
    assert held.try_ensure(50)
    with pytest.raises(RuntimeError, match="hold-and-wait"):
        await held.wait(120, 10)
    other = budget.reservation()
    with pytest.raises(Unavailable) as e:
        await other.wait(60, 0)  # no time left (a spent deadline, or body_budget_wait_s = 0)
    assert "after waiting" not in e.value.message
    with pytest.raises(Unavailable):
        await other.wait(101, 10)  # more than the whole budget: it could never fit
    assert budget.waited == 0 and budget.refused == 2 and budget.in_flight == 50
