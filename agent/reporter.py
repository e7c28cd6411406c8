"""Heartbeats to the fleet, kept through outages in a bounded buffer.

Every period the reporter builds one report and queues it, then sends what is
queued, oldest first. While the fleet is unreachable (or answering 5xx/429)
reports stay queued (a 503 + Retry-After is first waited out and retried by
the fleet client, see `agent.fleet_client`; if the fleet keeps shedding, the
report stays queued like any other retryable answer); past `max_buffer` the
oldest is dropped and counted, and
the count travels in the next report (`reports_dropped`), so the fleet knows
its series has a hole rather than seeing a quiet device. A report the fleet
refuses as malformed is dropped (and counted) instead of blocking the queue
forever. Logging happens on state changes only (link lost, link back).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .fleet_errors import AuthFailed, FleetRejected, FleetUnreachable

log = logging.getLogger(__name__)


class ReportSink(Protocol):
    async def send_report(self, report: Mapping[str, Any]) -> None: ...


class Reporter:
    def __init__(self, client: ReportSink, build_report: Callable[[], dict[str, Any]], period_s: float = 30.0,
                 max_buffer: int = 256) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        self.client = client
        self.build_report = build_report
        self.period_s = period_s
        self.max_buffer = max_buffer
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._lock = asyncio.Lock()
        self.dropped = 0
        self.rejected = 0
        self.sent = 0
        self.last_success: float | None = None
        self.last_error: Exception | None = None

    @property
    def buffered(self) -> int:
        return len(self._queue)

    def collect(self) -> None:
        """Build one report and queue it; a full queue loses its oldest report."""
        try:
            report = self.build_report()
        except Exception as e:  # a broken builder must not stop the loop (or serving)
            log.exception("building a report failed")
            self.last_error = e
            return
        self.enqueue(report)

    def enqueue(self, report: dict[str, Any]) -> None:
        """Queue a built report, stamped with every report lost so far (this one's arrival included)."""
        if len(self._queue) >= self.max_buffer:
            self._queue.popleft()
            self.dropped += 1
        lost = self.dropped + self.rejected
        self._queue.append({**report, "reports_dropped": lost} if lost else report)

    async def flush(self) -> int:
        """Send what is queued, oldest first, until done or the fleet stops answering; returns how many went."""
        sent = 0
        async with self._lock:
            while self._queue:
                report = self._queue[0]
                try:
                    await self.client.send_report(report)
                except (FleetUnreachable, AuthFailed) as e:
                    self._failed(e)
                    break
                except FleetRejected as e:
                    if e.retryable:
                        self._failed(e)
                        break
                    log.warning("fleet refused a report (%s); dropping it", e.reason)
                    self._queue.popleft()
                    self.rejected += 1
                    continue
                self._queue.popleft()
                sent += 1
                self.sent += 1
                self._succeeded()
        return sent

    async def run(self) -> None:
        """Collect and flush every `period_s` until cancelled (the daemon flushes once more on shutdown)."""
        while True:
            self.collect()
            await self.flush()
            await asyncio.sleep(self.period_s)

    def _failed(self, e: Exception) -> None:
        if self.last_error is None:
            log.warning("reports: fleet unreachable (%s); buffering up to %d", e, self.max_buffer)
        self.last_error = e

    def _succeeded(self) -> None:
        if self.last_error is not None:
            log.info("reports: fleet reachable again; %d still queued", len(self._queue))
        self.last_error = None
        self.last_success = time.time()
