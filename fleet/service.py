"""The fleet's services wired together: what one fleet process holds.

Built from a `ServerConfig` and handed to the HTTP layer; tests and the CLI's
bootstrap commands use the same object without any HTTP. Background work
(the assignment-change poll, retention) is started by `run_background`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy import delete

import bundle
from runtime import Backoff, Poller

from .admission import Admission
from .assignments import Assignments, ChangeNotifier
from .auth import AttemptLimiter, PrincipalCache
from .blobs import LocalBlobStore
from .bundles import BundleStore
from .config import ServerConfig
from .db import Database, Revocation, open_database
from .devices import DeviceRegistry
from .ingest import ReportBatcher
from .reports import Reports
from .signing import Signer, load_or_create
from .stalls import StallWatch
from .watch import watch

log = logging.getLogger(__name__)


@dataclass
class Fleet:
    config: ServerConfig
    db: Database
    blobs: LocalBlobStore
    signer: Signer
    bundles: BundleStore
    devices: DeviceRegistry
    assignments: Assignments
    notifier: ChangeNotifier
    reports: Reports
    report_batcher: ReportBatcher
    enroll_limiter: AttemptLimiter
    principals: PrincipalCache
    admission: Admission
    stall_watch: StallWatch

    @classmethod
    async def open(cls, config: ServerConfig) -> Fleet:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        trust = bundle.anchors(config.trusted_key_paths())
        signer = load_or_create(config.key_dir)
        blobs = LocalBlobStore(config.blob_dir)
        db = await open_database(config.db_url)
        notifier = ChangeNotifier(db, config.change_poll_s)
        reports = Reports(db, config.retention)
        stall_watch = StallWatch()
        return cls(
            config=config, db=db, blobs=blobs, signer=signer,
            bundles=BundleStore(db, blobs, trust, max_unpacked_bytes=2 * config.max_bundle_bytes),
            devices=DeviceRegistry(db),
            assignments=Assignments(db, signer, notifier, config.assignment_ttl_s),
            notifier=notifier, reports=reports, report_batcher=ReportBatcher(db, reports),
            enroll_limiter=AttemptLimiter(config.enroll_attempts_per_minute),
            principals=PrincipalCache(config.credential_cache_s), admission=Admission(db, stall_watch),
            stall_watch=stall_watch,
        )

    async def close(self) -> None:
        await self.report_batcher.close()
        await self.db.close()

    async def maintain_once(self) -> None:
        async with self.db.transaction() as s:
            await s.execute(delete(Revocation).where(Revocation.at < time.time() - 2 * self.config.credential_cache_s))
        folded, dropped = await self.reports.maintain()
        swept = await asyncio.to_thread(self.blobs.sweep_temporaries)
        collected = await self.bundles.collect_garbage()
        if folded or dropped or swept or collected:
            log.info("retention: folded %d raw points, dropped %d old points, swept %d temporaries, "
                     "collected %d unreferenced blobs", folded, dropped, swept, collected)

    async def _maintenance_loop(self) -> None:
        period_s = self.config.retention.maintenance_interval_s
        await Poller("retention pass", self.maintain_once, period_s, backoff=Backoff(period_s, period_s),
                     logger=log).run()

    @contextlib.asynccontextmanager
    async def run_background(self) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(watch(self.db, self.assignments, self.principals, self.config.change_poll_s),
                                     name="fleet-watch"),
                 asyncio.create_task(self._maintenance_loop(), name="fleet-retention"),
                 asyncio.create_task(self.stall_watch.run(), name="fleet-stall-watch")]
        try:
            yield
        finally:
            self.notifier.close()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
