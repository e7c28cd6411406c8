"""A deadline around an await that never loses a cancellation.

Why not `asyncio.wait_for`: before Python 3.12 it runs its awaitable in a task of
its own, and when the caller is cancelled in the same loop iteration as that task
completes, it returns the result and the cancellation is gone (CPython gh-86296;
3.12 rebuilt wait_for on `asyncio.timeout`, gh-96764). A loop that runs until
cancelled then never stops: the agent's reporter, sending a report every 10 ms
to a fleet on loopback, hung a test for 120 s in CI on 3.11 that way, and a
daemon would hang its stop until systemd killed it.

`asyncio.timeout` (3.11) and async-timeout (3.10, where aiohttp already depends
on it) run the await in the caller's own task, so a cancel always lands. Both
raise `TimeoutError` (which `asyncio.TimeoutError` is from 3.11 on, and the one
async-timeout raises on 3.10), so callers catch `asyncio.TimeoutError`.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # pragma: no cover - the 3.10 branch
    from async_timeout import timeout

__all__ = ["timeout"]
