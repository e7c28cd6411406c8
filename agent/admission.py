"""Admission by bytes: the request bodies held in memory at once are bounded.

A request queue bounds requests, not memory: eight 60 MB JSON bodies decoding at once
cost gigabytes on a device with one. Each HTTP request reserves its body's bytes
before they are read (its Content-Length; a body without one reserves as it arrives)
and holds them until its answer is written. A body up to the body limit always fits
when nothing else is in flight, so a big request is delayed by others, never refused forever.

A request whose Content-Length does not fit waits for room, first come first served,
for a short while (`ServerConfig.body_budget_wait_s`, cut to its own deadline), and
is answered 503 + Retry-After, unread, only if none comes. Refusing at once under a
burst of big bodies (64 clients x 3.1 MB images) turned most requests away, and the
CPU spent receiving and discarding them was the CPU served ones needed (bench/README.md,
Serving); a waiting request costs only its connection, since aiohttp stops reading a
socket whose handler does not read (its buffer is a few hundred KiB at most).

FIFO: once anyone waits, a newcomer queues behind them even if it would fit, or a
stream of small bodies would starve a big one forever. Waking grants the bytes in
order while they fit, so `in_flight` never exceeds the limit and no woken waiter
has to compete again.

No hold-and-wait: only a reservation that holds nothing may wait. A body without
Content-Length (chunked, or decompressed as it arrives) grows its reservation while
its bytes are already in memory; if two such half-received bodies could wait for
each other's room, both would sit holding bytes until their timeouts. So growth past
the room is refused at once (`ensure`).

A waiter whose client goes away is cancelled with its handler and leaves the queue at
once, when aiohttp sees the close: with a body over its read buffer (~128 KiB) the
socket is not being read, so the close shows only when room comes (the grant resumes
reading, which fails at once and returns the bytes) or the wait ends. Either way a
dead waiter delays the queue no longer than a live one would.

Loop-confined (no lock); a request that fits at once, with nobody waiting, costs two
comparisons and an addition: no future, task or timer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from types import TracebackType

from .errors import Unavailable


class ByteBudget:
    """Bytes reserved by requests in flight, at most `limit_bytes`, and the requests waiting for room.

    Counters for reporting: `waited` (requests that had to wait), `refused` (every 503 from the
    budget), `refused_after_wait` (those that waited first, then ran out of time), `waiting` (now).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.in_flight = 0
        self.refused = 0
        self.refused_after_wait = 0
        self.waited = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def reservation(self) -> Reservation:
        return Reservation(self)

    def _wake(self) -> None:
        """Grant room to the waiters at the head of the queue, in order, while they fit."""
        waiters = self._waiters
        while waiters:
            w = waiters[0]
            if w.future.done():  # cancelled, its task not yet resumed to leave: skip it, grant nothing
                waiters.popleft()
                continue
            if self.in_flight + w.n_bytes > self.limit_bytes:
                return
            waiters.popleft()
            self.in_flight += w.n_bytes
            w.reservation.held = w.n_bytes  # granted here, so a waiter cancelled right now still returns them
            w.future.set_result(True)

    def _refusal(self, n_bytes: int, waited_s: float | None = None) -> Unavailable:
        self.refused += 1
        after = ""
        if waited_s is not None:
            self.refused_after_wait += 1
            after = f" after waiting {waited_s:.3g} s"
        return Unavailable(f"request bodies in flight would exceed the {self.limit_bytes}-byte memory budget "
                           f"({self.in_flight} held, this one needs {n_bytes}){after}; retry later")


class _Waiter:
    __slots__ = ("future", "n_bytes", "reservation")

    def __init__(self, n_bytes: int, reservation: Reservation, future: asyncio.Future[bool]) -> None:
        self.n_bytes = n_bytes
        self.reservation = reservation
        self.future = future


class Reservation:
    """One request's share of the budget, grown as its body arrives, returned on exit."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held = 0

    def try_ensure(self, n_bytes: int) -> bool:
        """Hold at least n_bytes if they fit now; False (holding no more) if not.

        A fresh reservation also yields to anyone already waiting (FIFO); one that holds bytes
        (a body partly received) may grow into room that is free, which finishes it sooner.
        """
        more = n_bytes - self.held
        if more <= 0:
            return True
        b = self.budget
        if b.in_flight + more > b.limit_bytes or (b._waiters and not self.held):
            return False
        b.in_flight += more
        self.held = n_bytes
        return True

    def ensure(self, n_bytes: int) -> None:
        """Hold at least n_bytes, or raise Unavailable (503) at once without holding more."""
        if not self.try_ensure(n_bytes):
            raise self.budget._refusal(n_bytes)

    async def wait(self, n_bytes: int, wait_s: float) -> None:
        """Hold n_bytes once room comes, in arrival order; Unavailable (503) if none within wait_s.

        Only for a reservation that holds nothing yet (no hold-and-wait); call it after
        `try_ensure` failed, so the common path never gets here. A cancelled waiter (its
        client went away) leaves the queue at once; bytes granted to it are returned by
        `release`, as every reservation's are.
        """
        if self.held:
            raise RuntimeError("a reservation holding bytes must not wait for more (hold-and-wait)")
        b = self.budget
        if self.try_ensure(n_bytes):
            return
        if wait_s <= 0 or n_bytes > b.limit_bytes:
            raise b._refusal(n_bytes)
        loop = asyncio.get_running_loop()
        w = _Waiter(n_bytes, self, loop.create_future())
        b._waiters.append(w)
        b.waited += 1
        timer = loop.call_later(wait_s, self._expire, w)
        try:
            granted = await w.future
        except BaseException:  # cancelled: the client disconnected, or the server is stopping
            self._leave(w)
            raise
        finally:
            timer.cancel()
        if not granted:
            raise b._refusal(n_bytes, waited_s=wait_s)

    async def admit(self, n_bytes: int, wait_s: float, deadline: float) -> None:
        """A request's up-front reservation: at once when it fits (no future, no timer), else
        `wait` for at most `wait_s`, and never past the request's own `deadline` (monotonic)."""
        if not self.try_ensure(n_bytes):
            await self.wait(n_bytes, min(wait_s, deadline - time.monotonic()))

    def _expire(self, w: _Waiter) -> None:
        if not w.future.done():
            self._leave(w)
            w.future.set_result(False)

    def _leave(self, w: _Waiter) -> None:
        b = self.budget
        try:
            b._waiters.remove(w)
        except ValueError:
            return  # already granted: `release` returns its bytes
        b._wake()  # it may have been the head that the ones behind it were queued behind

    def release(self) -> None:
        b = self.budget
        b.in_flight -= self.held
        self.held = 0
        if b._waiters:
            b._wake()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
