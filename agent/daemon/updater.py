"""One bundle's update lifecycle, each step recorded on disk before the next begins.

    assigned -> prechecked -> downloaded -> installed -> built -> gated -> switched -> committed

`Updater.apply` takes one verified assignment entry to the served state or
refuses it; either way the version already serving is untouched until the
switch, which is one atomic record write followed by one on-loop pointer
move (`DataPlane.swap`; requests already inside the old version finish on
it). A refusal cleans up what the attempt made, records the step and reason
(`BundleRecord.last_failure`, an event for the fleet report), and, when it
is a property of the bundle rather than the weather (bad signature, below the
floor, failed gate), remembers the digest so the same bytes are not tried
again. `Updater.boot` runs at start: finishes or discards an interrupted
update, reverts a version that keeps crashing the agent to last-known-good,
and loads each active version independently of the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bundle import VerifiedBundle, atomic_writer, sha256_file
from contract import AssignedBundle, BundleConstraints, Event
from engines import EngineCache, HardwareInfo, plan

from ..dataplane import DataPlane, PreparedVersion
from ..download import BlobStore
from ..fleet_errors import DownloadHashMismatch, DownloadTooLarge, FleetLinkError
from . import faults
from .config import AgentConfig
from .errors import UpdateRefused
from .gate import health_gate
from .gc import collect
from .install import Expected, Installer, check_disk
from .preflight import check_constraints
from .state import STEPS, AgentState, BundleRecord, Installed, Pending, StateStore

log = logging.getLogger(__name__)

Fetch = Callable[[AssignedBundle], Awaitable[pathlib.Path]]


@dataclass
class Candidate:
    """A version to take to the served state: from an assignment or a local archive."""

    name: str
    version: str | None
    digest: str | None
    archive_sha256: str
    size: int
    ref: str
    #: from the signed assignment, checked before downloading (None: only after verification)
    constraints: BundleConstraints | None = None


class Updater:
    def __init__(self, config: AgentConfig, store: StateStore, installer: Installer, dataplane: DataPlane,
                 blobs: BlobStore, hardware: HardwareInfo, agent_state: AgentState,
                 on_event: Callable[[Event], None] = lambda e: None) -> None:
        self.config = config
        self.store = store
        self.installer = installer
        self.dataplane = dataplane
        self.blobs = blobs
        self.hardware = hardware
        self.agent_state = agent_state
        self.on_event = on_event
        self.serial: int | None = None
        #: called after every change of what is served (the daemon records it for `outpost agent status`)
        self.on_switch: Callable[[], None] = lambda: None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ events

    def event(self, kind: str, step: str, reason: str, ref: str | None = None) -> None:
        ev = Event(at=time.time(), kind=kind, step=step, reason=reason, ref=ref or None, serial=self.serial)
        self.agent_state.add_event(ev.to_json())
        self.store.save_agent(self.agent_state)
        model, _, version = (ref or "").partition("@")
        log.log(logging.WARNING if kind.endswith("refused") or kind == "reverted" else logging.INFO,
                "%s %s at %s: %s", kind, ref or "", step, reason,
                extra={"model": model or None, "version": version or None, "step": step})
        self.on_event(ev)

    # ------------------------------------------------------------------ the lifecycle

    async def apply(self, entry: AssignedBundle, fetch: Fetch) -> bool:
        """Take one assigned bundle to serving; True if it serves now (already or after this switch)."""
        cand = Candidate(entry.name, entry.version, entry.digest, entry.archive_sha256, entry.size, entry.ref,
                         entry.constraints)
        async with self._lock:
            rec = self.store.load(entry.name)
            if rec.active is not None and rec.active.digest == entry.digest:
                return True
            if rec.is_refused(entry.digest, self.serial):
                return False
            return await self._update(rec, cand, lambda: fetch(entry))

    async def import_archive(self, archive: pathlib.Path) -> Installed:
        """Air-gapped install of a local signed archive: the same verification, floor, gate and switch."""
        sha, _ = await asyncio.to_thread(sha256_file, archive)
        target = self.blobs.path(sha)
        if not target.exists():
            self.blobs.ensure()
            await asyncio.to_thread(_copy, archive, target)
        cand = Candidate("", None, None, sha, archive.stat().st_size, "")

        async def local() -> pathlib.Path:
            return target

        async with self._lock:
            vb, inst = await self._install_only(cand, local, floor_of=None)
            rec = self.store.load(vb.manifest.name)
            cand.name, cand.version, cand.digest = vb.manifest.name, inst.version, inst.digest
            cand.ref = vb.manifest.ref
            if rec.active is not None and rec.active.digest == inst.digest:
                return inst
            if not await self._update(rec, cand, local):
                failure = self.store.load(vb.manifest.name).last_failure or {}
                raise UpdateRefused(str(failure.get("step", "install")), str(failure.get("reason", "refused")))
            return inst

    async def _install_only(self, cand: Candidate, fetch: Callable[[], Awaitable[pathlib.Path]],
                            floor_of: BundleRecord | None) -> tuple[VerifiedBundle, Installed]:
        archive = await fetch()
        floor = floor_of.floor if floor_of is not None else 0
        vb, inst = await asyncio.to_thread(self.installer.install, archive, cand.archive_sha256,
                                           Expected(cand.name or None, cand.version, cand.digest), floor,
                                           self.hardware)
        if floor_of is None:  # import: the floor of the bundle the archive turned out to hold
            rec = self.store.load(vb.manifest.name)
            if vb.manifest.release < rec.floor:
                raise UpdateRefused("verify", f"{vb.manifest.ref} has release {vb.manifest.release}, below this "
                                              f"device's anti-rollback floor {rec.floor} for {rec.name}")
        return vb, inst

    async def _update(self, rec: BundleRecord, cand: Candidate,
                      fetch: Callable[[], Awaitable[pathlib.Path]]) -> bool:
        prepared: PreparedVersion | None = None
        rec.pending = Pending(cand.version or "", cand.digest or "", cand.archive_sha256, "assigned", time.time())
        self.store.save(rec)
        try:
            existing = self._existing_install(rec, cand)
            kept: VerifiedBundle | None = None
            if existing is not None:  # switching back to a kept install: no download, if it is still intact
                try:
                    kept = await asyncio.to_thread(self.installer.open_installed, existing)
                except UpdateRefused as e:
                    log.warning("kept install %s is damaged (%s); installing it again", existing.path, e.reason,
                                extra={"model": cand.name, "version": cand.version, "step": e.step})
            if existing is not None and kept is not None:
                vb = kept
                inst = dataclasses.replace(existing, release=vb.manifest.release)
                if inst.release < rec.floor:
                    raise UpdateRefused("verify", f"{cand.ref} has release {inst.release}, below this device's "
                                                  f"anti-rollback floor {rec.floor}")
                self.store.step(rec, "installed")
            else:
                if cand.constraints is not None:  # refuse what cannot run here before fetching a byte of it
                    check_constraints(cand.ref, cand.constraints, self.hardware)
                check_disk(self.config.state_dir, 2 * cand.size, self.config.update.disk_margin_bytes)
                self.store.step(rec, "prechecked")

                async def counted() -> pathlib.Path:
                    had = self.blobs.present(cand.archive_sha256) if _hex(cand.archive_sha256) else None
                    path = await fetch()
                    if had is None:
                        self.agent_state.downloads += 1
                        self.store.save_agent(self.agent_state)
                    self.store.step(rec, "downloaded")
                    return path

                vb, inst = await self._install_only(cand, counted, rec)
                rec.archives[pathlib.Path(inst.path).name] = inst.archive_sha256
                self.store.step(rec, "installed")
            prepared = await asyncio.to_thread(self._build, vb)
            self.store.step(rec, "built")
            await asyncio.to_thread(health_gate, prepared, self.config.update.health_runs,
                                    self.config.update.slo_margin)
            self.store.step(rec, "gated")
            # switch: one atomic record write names the new active install, then one pointer move
            if rec.active is not None and rec.active.digest != inst.digest:
                rec.last_known_good = rec.active
            rec.active = inst
            self.store.step(rec, "switched")
            await self.dataplane.swap(prepared)
            prepared = None
            self.on_switch()
            # commit
            rec.floor = max(rec.floor, inst.release)
            rec.pending = None
            rec.last_failure = None
            self.store.save(rec)
            self.event("switched", "commit", f"serving {vb.manifest.ref} (digest {inst.digest[:12]})",
                       vb.manifest.ref)
            others = [r for r in self.store.all() if r.name != rec.name]
            collect(rec, self.installer, self.blobs, self.config.update.retain_versions, others)
            self.store.save(rec)
            return True
        except (UpdateRefused, FleetLinkError) as e:
            refused = _as_refusal(e)
            if prepared is not None:
                await asyncio.to_thread(prepared.close)
            step = rec.pending.step if rec.pending is not None else "assigned"
            rec.pending = None
            rec.last_failure = {"ref": cand.ref, "step": refused.step, "after": step, "reason": refused.reason,
                                "at": time.time()}
            if refused.permanent and cand.digest:
                rec.refused[cand.digest] = f"{refused.step}: {refused.reason}"
                if self.serial is not None:
                    rec.refused_serial[cand.digest] = self.serial
            self.store.save(rec)
            self.event("install_refused" if refused.verdict else "install_failed", refused.step,
                       refused.reason, cand.ref)
            return False

    def _existing_install(self, rec: BundleRecord, cand: Candidate) -> Installed | None:
        for inst in (rec.active, rec.last_known_good):
            if inst is not None and inst.digest == cand.digest:
                return inst
        if cand.version and cand.digest:
            path = self.installer.target(cand.name, cand.version, cand.digest)
            archive = rec.archives.get(path.name)
            if path.is_dir() and archive is not None:  # release: read from the verified copy by the caller
                return Installed(cand.version, 0, cand.digest, archive, str(path))
        return None

    def _build(self, vb: VerifiedBundle) -> PreparedVersion:
        """Engines from the verified read-only copy; the model bytes are hashed again after the build.

        A model file swapped while the engine was built (THREATS #12) changes
        its hash: the prepared version is discarded and the cache entries made
        for it are removed, so those bytes are never served nor loaded later.
        """
        try:
            prepared = self.dataplane.prepare(vb, self.config.model_config())
        except Exception as e:
            raise UpdateRefused("build", f"{type(e).__name__}: {e}") from e
        for entry in vb.manifest.models:
            actual, _ = sha256_file(vb.model_path(entry.name))
            if actual != entry.sha256:
                prepared.close()
                self._drop_cache_entries(vb, entry.name)
                raise UpdateRefused("build", f"model file {entry.file} changed during the engine build "
                                             f"(sha256 {actual[:16]}..., signed {entry.sha256[:16]}...); discarded")
        return prepared

    def _drop_cache_entries(self, vb: VerifiedBundle, model: str) -> None:
        cache = EngineCache(self.config.engine_cache_dir)
        try:
            steps = plan(vb, model, cache_dir=cache, probe=self.dataplane.engines.probe, check_cache=False).steps
        except Exception:  # nothing buildable: nothing cached either
            return
        for step in steps:
            cache.remove(step.key)

    # ------------------------------------------------------------------ start-up

    async def boot(self) -> None:
        """Resolve interrupted updates, revert crash loops, and load every active version (each on its own)."""
        self.installer.sweep_staging()
        for rec in self.store.all():
            await self._boot_one(rec)

    async def _boot_one(self, rec: BundleRecord) -> None:
        if rec.pending is not None:
            if STEPS.index(rec.pending.step) >= STEPS.index("switched") and rec.active is not None:
                rec.floor = max(rec.floor, rec.active.release)  # switched, then killed before the commit
            rec.pending = None  # anything earlier is discarded: the active version never changed
            self.store.save(rec)
        if rec.active is None:
            return
        limit = self.config.update.max_failed_starts
        failed = self.store.failed_starts(rec.name, rec.active.digest)
        if failed >= limit and rec.last_known_good is not None:
            # (with no last-known-good, the only version there is keeps being tried)
            bad = rec.active
            rec.refused[bad.digest] = f"crash loop: {failed} starts did not become stable"
            rec.refused_serial.pop(bad.digest, None)  # for good: reassigning it would crash again
            rec.active, rec.last_known_good = rec.last_known_good, None
            self.store.save(rec)
            self.event("reverted", "revert", f"{rec.name} {bad.ref_suffix} failed {limit} starts; back to "
                                           f"last-known-good {rec.active.ref_suffix}", f"{rec.name}@{bad.version}")
            failed = self.store.failed_starts(rec.name, rec.active.digest)
        self.store.set_failed_starts(rec.name, rec.active.digest, failed + 1)
        ref = f"{rec.name}@{rec.active.version}"
        faults.reached(f"load:{ref}")
        try:
            vb = await asyncio.to_thread(self.installer.open_installed, rec.active)
            prepared = await asyncio.to_thread(self._build, vb)
        except UpdateRefused as e:
            self.dataplane.mark_failed(rec.name, f"{e.step}: {e.reason}")
            self.event("install_failed", "start", f"{e.step}: {e.reason}", ref)
            if rec.last_known_good is not None:  # the active copy is broken: last-known-good now, no loop needed
                self.store.set_failed_starts(rec.name, rec.active.digest, limit)
                await self._boot_one(rec)
            return
        await self.dataplane.swap(prepared)

    def mark_stable(self) -> None:
        """Called once the agent has served for `stable_after_s`: the failed-start counters go back to 0."""
        for rec in self.store.all():
            if rec.active is not None and self.store.failed_starts(rec.name, rec.active.digest):
                self.store.set_failed_starts(rec.name, rec.active.digest, 0)

    async def retire(self, names: set[str]) -> None:
        """Stop serving bundles the assignment no longer lists (their install stays as last-known-good)."""
        async with self._lock:
            for rec in self.store.all():
                if rec.name in names or rec.active is None:
                    continue
                for sm in self.dataplane.models():
                    if sm.bundle.manifest.name == rec.name:
                        await self.dataplane.unload(sm.name, sm.version)
                rec.last_known_good, rec.active = rec.active, None
                self.store.save(rec)
                self.on_switch()
                log.info("%s is no longer assigned: stopped serving it (kept as last-known-good)", rec.name,
                         extra={"model": rec.name, "version": rec.last_known_good.version, "step": "retire"})


def _as_refusal(e: Exception) -> UpdateRefused:
    if isinstance(e, UpdateRefused):
        return e
    tampered = isinstance(e, (DownloadHashMismatch, DownloadTooLarge))
    return UpdateRefused("download", str(e), permanent=False, verdict=tampered)


def _hex(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _copy(src: pathlib.Path, dst: pathlib.Path) -> None:
    with open(src, "rb") as fin, atomic_writer(dst, mode=0o600) as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
