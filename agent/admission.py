"""Admission by bytes: the request bodies held in memory at once are bounded.

A request queue bounds requests, not memory: eight 60 MB JSON bodies decoding at once
cost gigabytes on a device with one. Each HTTP request reserves its body's bytes
before they are read (its Content-Length; a body without one reserves as it arrives)
and holds them until its answer is written; a request that does not fit is answered
503 + Retry-After at once, unread. A body up to the body limit always fits when
nothing else is in flight, so a big request is delayed by others, never refused forever.
"""

from __future__ import annotations

from types import TracebackType

from .errors import Unavailable


class ByteBudget:
    """Bytes reserved by requests in flight, at most `limit_bytes`. Loop-confined (no lock)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.in_flight = 0
        self.refused = 0

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """One request's share of the budget, grown as its body arrives, returned on exit."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held = 0

    def ensure(self, n_bytes: int) -> None:
        """Hold at least n_bytes, or raise Unavailable (503) without holding more."""
        more = n_bytes - self.held
        if more <= 0:
            return
        b = self.budget
        if b.in_flight + more > b.limit_bytes:
            b.refused += 1
            raise Unavailable(f"request bodies in flight would exceed the {b.limit_bytes}-byte memory budget "
                              f"({b.in_flight} held, this one needs {n_bytes}); retry later")
        b.in_flight += more
        self.held = n_bytes

    def release(self) -> None:
        self.budget.in_flight -= self.held
        self.held = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
