"""The sync coordinator: learn the assignment from the fleet, verify it, hand each bundle to the updater.

One step of the `runtime.Poller`: a long-poll for the assignment (the first
one after start asks at once; later ones name the serial already held, so
the fleet answers the moment it changes or after `long_poll_s`), then
`contract.verify_assignment` against the trusted fleet key(s) and the
persisted trusted state (device id, last serial). A rejected document
(foreign, replayed, expired, wrong key, garbled) installs nothing, is
recorded as an event for the fleet report, and counts as a failed poll (so
the next one backs off); serving is untouched. An accepted one is persisted
(serial first: a replay of anything older is refused from then on), then
each bundle is updated independently, and bundles no longer listed stop
serving. The fleet being unreachable is weather: the Poller backs off with
full jitter and logs once when it starts failing and once when it recovers.

`nudge(serial)` (the fleet's MQTT wake-up) cuts a held long-poll or a
backoff short and asks the fleet at once, if the serial is newer than the
one held; the nudge itself is never trusted: the answer to that poll is
verified like any other.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from contract import AssignedBundle, AssignmentRejected, AssignmentState, verify_assignment
from runtime import Backoff, Poller

from ..download import BlobStore
from ..fleet_client import FleetClient
from .config import AgentConfig
from .state import AgentState, StateStore
from .updater import Updater

log = logging.getLogger(__name__)


class SyncCoordinator:
    def __init__(self, config: AgentConfig, client: FleetClient, updater: Updater, store: StateStore,
                 agent_state: AgentState, fleet_keys: Sequence[bytes], blobs: BlobStore,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.client = client
        self.updater = updater
        self.store = store
        self.state = agent_state
        self.fleet_keys = list(fleet_keys)
        self.blobs = blobs
        self.clock = clock
        self._asked_once = False
        self._nudged = asyncio.Event()
        #: nudges that cut a wait short (tests and status read it)
        self.nudges = 0
        self._last_nudge = -1e9
        self.poller = Poller("fleet sync", self.step, 0.0, logger=log,
                             backoff=Backoff(config.sync.retry_base_s, config.sync.retry_max_s))

    def nudge(self, serial: int) -> None:
        """The fleet says serial `serial` is out: poll now (ignored when this device already has it)."""
        if self._asked_once and serial <= self.state.serial:
            return
        now = time.monotonic()
        if self.poller.failing and now - self._last_nudge < max(1.0, self.config.sync.retry_base_s):
            return  # while the fleet is failing, a stream of (possibly forged) nudges must not defeat the backoff
        self._last_nudge = now
        self.nudges += 1
        self._nudged.set()
        self.poller.wake()

    async def _learn(self, known: int | None) -> dict[str, Any]:
        """The long-poll, abandoned for an immediate poll if a nudge arrives while it is held."""
        self._nudged.clear()
        if known is None:
            return await self.client.poll_assignment(None, self.config.sync.long_poll_s)
        poll = asyncio.ensure_future(self.client.poll_assignment(known, self.config.sync.long_poll_s))
        nudged = asyncio.ensure_future(self._nudged.wait())
        try:
            await asyncio.wait({poll, nudged}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            nudged.cancel()
            if not poll.done():
                poll.cancel()
            await asyncio.gather(poll, nudged, return_exceptions=True)
        if not poll.cancelled():
            return poll.result()
        self._nudged.clear()
        return await self.client.poll_assignment(None, self.config.sync.long_poll_s)

    async def step(self) -> None:
        known = self.state.serial if self._asked_once else None
        try:
            envelope = await self._learn(known)
        except Exception as e:
            self._note_error(str(e))
            raise
        self._asked_once = True
        trusted = AssignmentState(self.client.device_id, self.state.serial, self.state.issued_at)
        try:
            assignment = verify_assignment(envelope, self.fleet_keys, trusted, self.clock())
        except AssignmentRejected as e:
            self.updater.event("assignment_rejected", "assignment", f"{type(e).__name__}: {e}")
            self._note_error(f"assignment rejected: {e}")
            raise
        after = trusted.after(assignment)
        self.state.device_id = self.client.device_id
        self.state.serial, self.state.issued_at = after.last_serial, after.last_issued_at
        self.state.expires_at = assignment.expires_at
        self.state.last_sync = self.clock()
        self.state.last_error = None
        self.store.save_agent(self.state)
        self.updater.serial = assignment.serial
        revoked = set(assignment.revoked)
        wanted = [b for b in assignment.bundles if not b.revoked and b.ref not in revoked]
        for entry in wanted:
            await self.updater.apply(entry, self.fetch)
        await self.updater.retire({b.name for b in wanted})

    async def fetch(self, entry: AssignedBundle) -> pathlib.Path:
        return await self.client.download(entry.url, self.blobs, entry.archive_sha256, entry.size)

    def _note_error(self, message: str) -> None:
        self.state.last_error = message[:500]
        self.store.save_agent(self.state)

    async def run(self) -> None:
        await self.poller.run()
