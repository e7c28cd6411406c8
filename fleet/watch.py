"""What one fleet process learns from the others, once per `change_poll_s`.

Fleet processes share nothing but the database. Each runs this loop: it
wakes long-polls whose device's assignment another process changed, and
drops credentials that another process revoked from its cache. Two small
indexed queries per period, whatever the number of devices; seeing a change
twice is harmless, so the window looks back a margin for clock skew between
hosts and for transactions that committed after the previous look.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select

from runtime import Backoff, Poller

from .assignments import Assignments
from .auth import PrincipalCache
from .db import Database, Revocation

log = logging.getLogger(__name__)
MARGIN_S = 10.0


async def revocations_since(db: Database, cache: PrincipalCache, assignments: Assignments, since: float) -> None:
    async with db.read() as s:
        rows = (await s.execute(select(Revocation.kind, Revocation.subject).where(Revocation.at >= since))).all()
    for kind, subject in rows:
        if kind == "device":
            cache.forget_device(subject)
            assignments.forget(subject)
        else:
            cache.forget_token(subject)


async def watch(db: Database, assignments: Assignments, cache: PrincipalCache, period_s: float) -> None:
    """Long-polls just time out while the database is unreachable; trust falls back to the cache TTL."""
    since = time.time() - MARGIN_S

    async def step() -> None:
        nonlocal since
        started = time.time()
        await revocations_since(db, cache, assignments, since)
        await assignments.notifier.poll_changes(since)
        since = started - MARGIN_S

    poller = Poller("watching the database for other processes' changes", step, period_s,
                    backoff=Backoff(base_s=period_s, max_s=period_s), logger=log, initial_delay_s=period_s)
    await poller.run()
