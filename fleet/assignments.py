"""What each device should run, served as a signed document, with long-poll.

The document's format, its canonical bytes, the envelope (`seal`) and the
device's verification live in `contract.assignment`, shared with the agent;
this module decides the content and signs it, at ``GET
/api/v1/devices/{id}/assignment`` (the key at ``GET /api/v1/keys/assignment``).

The serial grows by one with every change of the device's set and with every
revocation that concerns it, and is never reused; the same serial is re-signed
with a fresh expiry on every request (a device refuses a lower serial as a
replay and an expired document as a freeze). ``revoked`` lists the revoked
bundles the device is assigned or last reported installed: it must stop
running them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import delete, select, update

from contract.assignment import MAX_BUNDLES, BundleConstraints, build_document, bundle_entry, seal

from .bundles import parse_ref
from .db import AssignmentItem, Bundle, Database, Device, DeviceBundle
from .errors import Conflict, InvalidRequest, NotFound
from .signing import Signer

MAX_BUNDLES_PER_DEVICE = MAX_BUNDLES


class _Unchanged(Exception):
    def __init__(self, serial: int) -> None:
        self.serial = serial


class ChangeNotifier:
    """Wakes long-polls in this process, and remembers each device's current serial.

    The remembered serials let a long-poll that times out, or starts with a
    serial that is still current, be answered without touching the database.
    They stay right because every change passes through here: changes made in
    this process call `notify`, which forgets the device's serial (the woken
    waiter reads it afresh); changes made by other fleet processes are found by
    `poll_changes`, one query per period for devices whose assignment changed
    recently, whatever the number of devices. A serial known here is therefore
    at most one period behind the database, and a waiter is woken within a
    period of any change.
    """

    def __init__(self, db: Database, poll_s: float, max_serials: int = 1_000_000) -> None:
        self.db = db
        self.poll_s = poll_s
        self.max_serials = max_serials
        #: device id -> {event: serial the waiter already has}
        self._waiters: dict[str, dict[asyncio.Event, int]] = {}
        self._serials: dict[str, int] = {}
        self.closing = False

    def close(self) -> None:
        """Shutting down: answer every long-poll now instead of holding the exit."""
        self.closing = True
        for peers in self._waiters.values():
            for ev in peers:
                ev.set()

    @contextlib.contextmanager
    def subscribe(self, device_id: str, known_serial: int) -> Iterator[asyncio.Event]:
        ev = asyncio.Event()
        self._waiters.setdefault(device_id, {})[ev] = known_serial
        try:
            yield ev
        finally:
            peers = self._waiters.get(device_id)
            if peers is not None:
                peers.pop(ev, None)
                if not peers:
                    del self._waiters[device_id]

    def known_serial(self, device_id: str) -> int | None:
        return self._serials.get(device_id)

    def remember(self, device_id: str, serial: int) -> None:
        if len(self._serials) >= self.max_serials:
            self._serials.clear()
        self._serials[device_id] = max(serial, self._serials.get(device_id, serial))

    def forget(self, device_id: str) -> None:
        self._serials.pop(device_id, None)

    def notify(self, device_ids: Iterable[str]) -> None:
        """These devices changed (here): forget their serials and wake their waiters."""
        for device_id in device_ids:
            self._serials.pop(device_id, None)
            for ev in self._waiters.get(device_id, ()):
                ev.set()

    def notify_serials(self, serials: Iterable[tuple[str, int]]) -> None:
        # Serials only grow: a value older than what we know is a read that raced a commit here.
        for device_id, serial in serials:
            if device_id in self._serials and serial > self._serials[device_id]:
                self._serials[device_id] = serial
            for ev, known in self._waiters.get(device_id, {}).items():
                if serial > known:
                    ev.set()

    @property
    def waiting(self) -> int:
        return sum(len(v) for v in self._waiters.values())

    async def poll_changes(self, since: float) -> None:
        """Learn serials that moved since `since` (any process's doing) and wake their waiters."""
        if not self._waiters and not self._serials:
            return
        async with self.db.read() as s:
            rows = (await s.execute(select(Device.id, Device.assignment_serial)
                                    .where(Device.assignment_changed_at >= since))).all()
        self.notify_serials((r[0], r[1]) for r in rows)


class Assignments:
    def __init__(self, db: Database, signer: Signer, notifier: ChangeNotifier, ttl_s: float,
                 cache_max: int = 100_000) -> None:
        self.db = db
        self.signer = signer
        self.notifier = notifier
        self.ttl_s = ttl_s
        self._resign_s = min(ttl_s / 4, 600.0)
        self._cache_max = cache_max
        #: device id -> (serial, issued_at, signed response)
        self._cache: OrderedDict[str, tuple[int, float, dict[str, Any]]] = OrderedDict()

    async def set(self, device_id: str, refs: list[str]) -> int:
        """Replace the device's set; returns its serial (unchanged if the set is the same)."""
        if len(refs) > MAX_BUNDLES_PER_DEVICE:
            raise InvalidRequest(f"at most {MAX_BUNDLES_PER_DEVICE} bundles per device")
        wanted = {parse_ref(r) for r in refs}
        names = [n for n, _ in wanted]
        if len(set(names)) != len(names):
            raise InvalidRequest("at most one version of each bundle name per device")
        now = time.time()
        try:
            async with self.db.transaction() as s:
                bundles = []
                for name, version in sorted(wanted):
                    b = (await s.execute(select(Bundle).where(Bundle.name == name,
                                                              Bundle.version == version))).scalar()
                    if b is None:
                        raise NotFound(f"no bundle {name}@{version}")
                    if b.revoked_at is not None:
                        raise Conflict(f"{name}@{version} is revoked and cannot be assigned")
                    bundles.append(b)
                # The UPDATE takes the device's row lock first: concurrent changes queue here.
                serial = (await s.execute(
                    update(Device).where(Device.id == device_id)
                    .values(assignment_serial=Device.assignment_serial + 1, assignment_changed_at=now)
                    .returning(Device.assignment_serial))).scalar()
                if serial is None:
                    raise NotFound(f"no device {device_id}")
                current = set((await s.execute(select(AssignmentItem.bundle_id)
                                               .where(AssignmentItem.device_id == device_id))).scalars())
                if current == {b.id for b in bundles}:
                    raise _Unchanged(serial - 1)  # rolls the bump back
                await s.execute(delete(AssignmentItem).where(AssignmentItem.device_id == device_id))
                s.add_all(AssignmentItem(device_id=device_id, bundle_id=b.id) for b in bundles)
        except _Unchanged as same:
            return same.serial
        self.notifier.notify([device_id])
        return serial

    async def serial(self, device_id: str) -> int:
        async with self.db.read() as s:
            serial = (await s.execute(select(Device.assignment_serial).where(Device.id == device_id))).scalar()
        if serial is None:
            raise NotFound(f"no device {device_id}")
        return serial

    async def document(self, device_id: str, serial: int | None = None) -> dict[str, Any]:
        """The signed document; re-used while its serial is current and it is fresh enough.

        Every change of content bumps the serial, so (device, serial) names one
        content; re-signing happens at most every `_resign_s` to keep expiry far.
        """
        if serial is None:
            serial = await self.serial(device_id)
        cached = self._cache.get(device_id)
        if cached is not None and cached[0] == serial and cached[1] > time.time() - self._resign_s:
            return cached[2]
        signed = await self._build(device_id)
        self._cache[device_id] = (signed["document"]["serial"], signed["document"]["issued_at"], signed)
        self._cache.move_to_end(device_id)
        while len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return signed

    async def _build(self, device_id: str) -> dict[str, Any]:
        async with self.db.read() as s:
            serial = (await s.execute(select(Device.assignment_serial).where(Device.id == device_id))).scalar()
            if serial is None:
                raise NotFound(f"no device {device_id}")
            rows = (await s.execute(select(Bundle).join(AssignmentItem, AssignmentItem.bundle_id == Bundle.id)
                                    .where(AssignmentItem.device_id == device_id)
                                    .order_by(Bundle.name))).scalars().all()
            installed = (await s.execute(
                select(Bundle.name, Bundle.version)
                .join(DeviceBundle, DeviceBundle.ref == Bundle.name + "@" + Bundle.version)
                .where(DeviceBundle.device_id == device_id, Bundle.revoked_at.is_not(None)))).all()
        now = time.time()
        revoked = {f"{b.name}@{b.version}" for b in rows if b.revoked_at is not None}
        revoked.update(f"{n}@{v}" for n, v in installed)
        # The manifest's constraints travel in the entry so a device can refuse before downloading.
        entries = [bundle_entry(b.name, b.version, b.release, b.digest, b.archive_sha256, b.size,
                                b.revoked_at is not None, BundleConstraints.from_manifest(b.manifest or {}))
                   for b in rows]
        doc = build_document(device_id, serial, now, now + self.ttl_s, entries, revoked)
        return seal(doc, self.signer.sign, self.signer.key_id)

    async def current_serial(self, device_id: str) -> int:
        """The serial as this process knows it (at most one watch period behind), else from the database."""
        known = self.notifier.known_serial(device_id)
        if known is not None:
            return known
        serial = await self.serial(device_id)
        self.notifier.remember(device_id, serial)
        return serial

    def knows(self, device_id: str) -> bool:
        """Whether this process has served the device before (its serial or document is cached)."""
        return device_id in self._cache or self.notifier.known_serial(device_id) is not None

    def forget(self, device_id: str) -> None:
        """The device is gone: drop what this process remembers of it."""
        self.notifier.forget(device_id)
        self._cache.pop(device_id, None)

    async def wait(self, device_id: str, known_serial: int | None, wait_s: float) -> dict[str, Any]:
        """Answer when the serial differs from `known_serial`, or after at most `wait_s`.

        The wait is cut by a random quarter at most, so that devices that all
        started polling together (after a fleet restart) drift apart instead
        of coming back in one herd every period. In the steady state (serial
        remembered, document cached) a long-poll costs no database query.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s * random.uniform(0.75, 1.0)
        known = -1 if known_serial is None else known_serial
        with self.notifier.subscribe(device_id, known) as changed:
            # The deadline sets the same event a change sets: no task, no cancellation and no
            # exception per held poll (asyncio.wait_for made all three), which thousands of
            # held polls would otherwise keep alive for the garbage collector to walk.
            expired: list[bool] = []  # set by the timer itself: asyncio may run it a tick early

            def expire() -> None:
                expired.append(True)
                changed.set()

            timer = loop.call_at(deadline, expire)
            try:
                while True:
                    changed.clear()  # before reading: a change made meanwhile must still wake us
                    serial = await self.current_serial(device_id)
                    if serial != known or expired or self.notifier.closing:
                        break
                    await changed.wait()
            finally:
                timer.cancel()
        return await self.document(device_id, serial)
