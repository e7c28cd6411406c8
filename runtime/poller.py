"""A polling coordinator: run one step again and again, back off on failure, log only state changes.

In the style of Home Assistant's update coordinator: the owner hands in one
async `poll` step; the Poller calls it every `interval_s` while it succeeds
and after an exponentially growing, fully jittered delay while it fails. The
result of the last try is exposed (`last_success`, `last_error`, `failing`)
for health endpoints and status commands, and the log gets exactly one line
when polling starts failing and one when it recovers, never one per retry.

`wake()` cuts the current wait short (an MQTT nudge, a test), so a caller
never needs its own loop around this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .timeouts import timeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Delay before retry n (0-based): uniform in [0, min(max_s, base_s * 2**n)] ("full jitter")."""

    base_s: float = 1.0
    max_s: float = 60.0

    def delay_s(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        return rand() * min(self.max_s, self.base_s * float(2 ** min(attempt, 30)))


@dataclass(frozen=True)
class PollerStatus:
    name: str
    #: wall-clock time (time.time()) of the last successful poll; None before the first
    last_success: float | None
    #: the last failure's message; None once a poll succeeded after it
    last_error: str | None
    last_error_at: float | None
    consecutive_failures: int

    @property
    def failing(self) -> bool:
        return self.consecutive_failures > 0


class Poller:
    """Runs `poll()` until cancelled; `interval_s` after a success, backoff after a failure.

    `poll` may itself block for a long time (a long-poll): the interval is the
    pause between the end of one step and the start of the next. Exceptions in
    `errors` count as failures; anything else propagates and ends `run()`,
    because it is a bug rather than weather.
    """

    def __init__(self, name: str, poll: Callable[[], Awaitable[object]], interval_s: float, *,
                 backoff: Backoff | None = None, errors: tuple[type[BaseException], ...] = (Exception,),
                 logger: logging.Logger | None = None, initial_delay_s: float = 0.0) -> None:
        self.name = name
        self._poll = poll
        self.interval_s = interval_s
        self.backoff = backoff or Backoff()
        self._errors = errors
        self._log = logger or log
        self._initial_delay_s = initial_delay_s
        self._wake = asyncio.Event()
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.consecutive_failures = 0

    @property
    def failing(self) -> bool:
        return self.consecutive_failures > 0

    def status(self) -> PollerStatus:
        return PollerStatus(self.name, self.last_success, self.last_error, self.last_error_at,
                            self.consecutive_failures)

    def wake(self) -> None:
        """Poll now instead of waiting out the current interval or backoff."""
        self._wake.set()

    async def run_once(self) -> bool:
        """One step; True on success. Logs a line only when the failing/recovered state changes."""
        try:
            await self._poll()
        except self._errors as e:
            self.last_error = f"{type(e).__name__}: {e}" if not str(e) else str(e)
            self.last_error_at = time.time()
            if self.consecutive_failures == 0:
                self._log.warning("%s failing: %s", self.name, self.last_error)
            self.consecutive_failures += 1
            return False
        if self.consecutive_failures:
            self._log.warning("%s recovered after %d failed tries", self.name, self.consecutive_failures)
        self.consecutive_failures = 0
        self.last_error = None
        self.last_success = time.time()
        return True

    def next_delay_s(self) -> float:
        if self.consecutive_failures:
            return max(self.interval_s, self.backoff.delay_s(self.consecutive_failures - 1))
        return self.interval_s

    async def _sleep(self, delay_s: float) -> None:
        if delay_s <= 0 and not self._wake.is_set():
            await asyncio.sleep(0)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            async with timeout(delay_s):
                await self._wake.wait()
        self._wake.clear()

    async def run(self) -> None:
        await self._sleep(self._initial_delay_s)
        while True:
            await self.run_once()
            await self._sleep(self.next_delay_s())
