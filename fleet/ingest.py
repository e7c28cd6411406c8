"""Group commit for device reports: many reports, one transaction.

At 2,000 devices reporting every 10 s the fleet takes ~200 reports a second.
Stored one transaction each, every report holds a database connection across
several event-loop turns (begin, update, insert, commit), and on SQLite's
single writer that caps throughput far below the load. The batcher queues
reports and a single task writes everything queued in one transaction with a
constant number of statements (a bulk UPDATE of latest state, one SELECT of
bundle digests, a multi-row INSERT of telemetry); each request is answered
only once its batch has committed, so 202 still means "stored". Reports whose
installed bundles changed are handled together, still in a constant number of
statements per batch (`Reports.record_installed`).
If a batch fails (say, a device was deleted mid-batch), its reports are
retried one by one so that one bad report cannot fail the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

from sqlalchemy import insert, select, update

from .db import Database, Device, TelemetryPoint
from .errors import Busy, NotFound
from .reports import Reports

log = logging.getLogger(__name__)
#: A batch slower than this is logged: every report in it, and every one queued behind it, waited.
SLOW_BATCH_MS = 100.0
_Item = tuple[str, dict[str, Any], "asyncio.Future[tuple[int, bool]]"]


class ReportBatcher:
    def __init__(self, db: Database, reports: Reports, max_batch: int = 500, max_pending: int = 1000,
                 spread_s: float = 10.0) -> None:
        self.db = db
        self.reports = reports
        self.max_batch = max_batch
        #: Beyond this many queued reports, new ones are refused with a jittered Retry-After
        #: (`fleet.admission`): the device keeps its report and sends it later.
        self.max_pending = max_pending
        self.spread_s = spread_s
        self._pending: list[_Item] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, device_id: str, report: dict[str, Any]) -> tuple[int, bool]:
        """Queue one report; returns (points stored, serial bumped) after its batch commits."""
        if len(self._pending) >= self.max_pending:
            raise Busy(random.uniform(1.0, self.spread_s), f"{len(self._pending)} reports queued")
        fut: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        self._pending.append((device_id, report, fut))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="fleet-report-writer")
        return await fut

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, _, fut in self._pending:
            if not fut.done():
                fut.cancel()
        self._pending.clear()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                started = time.perf_counter()
                try:
                    await self._write(batch)
                except Exception as e:
                    log.info("report batch of %d failed (%s); storing one by one", len(batch), e)
                    await self._one_by_one(batch)
                took_ms = (time.perf_counter() - started) * 1000
                if took_ms >= SLOW_BATCH_MS:
                    log.warning("report batch of %d took %.0f ms (%d more queued meanwhile)", len(batch), took_ms,
                                len(self._pending))

    async def _write(self, batch: list[_Item]) -> None:
        now = time.time()
        prepared = [self.reports.prepare(device_id, report, now) for device_id, report, _ in batch]
        async with self.db.transaction() as s:
            ids = list({p.device_id for p in prepared})
            stored = dict((await s.execute(select(Device.id, Device.bundles_digest)
                                            .where(Device.id.in_(ids)))).tuples().all())
            latest = {p.device_id: p for p in prepared if p.device_id in stored}  # the last report wins
            changed = {d: p for d, p in latest.items() if p.bundles is not None and p.digest != stored[d]}
            if latest:
                await s.execute(update(Device), [
                    {"id": d, "last_seen_at": now, "state": p.state,
                     "bundles_digest": p.digest if p.bundles is not None else stored[d]}
                    for d, p in latest.items()])
            bumped = await self.reports.record_installed(s, changed, now)
            points = [pt for p in prepared if p.device_id in stored for pt in p.points]
            if points:
                await s.execute(insert(TelemetryPoint), points)
        for (_, _, fut), p in zip(batch, prepared, strict=True):
            if fut.done():
                continue
            if p.device_id not in stored:
                fut.set_exception(NotFound(f"no device {p.device_id}"))
            else:
                fut.set_result((len(p.points), p.device_id in bumped and latest[p.device_id] is p))

    async def _one_by_one(self, batch: list[_Item]) -> None:
        for device_id, report, fut in batch:
            if fut.done():
                continue
            try:
                result = await self.reports.ingest(device_id, report)
            except Exception as e:
                if not fut.done():  # the client may have gone (request cancelled) meanwhile
                    fut.set_exception(e)
            else:
                if not fut.done():
                    fut.set_result(result)
