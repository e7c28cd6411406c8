"""The versioned model store: accept, list, serve and revoke signed bundles.

A push is verified exactly as a device would verify it (unpack with the
bundle library's safe extractor, then `bundle.verify` against the fleet's
release keys) before anything becomes visible: a refused bundle leaves no blob
and no row. Versions are immutable and identified by the digest of their
signed manifest, so re-packing the same signed directory is still "the same
content" (a no-op) while anything else under an existing version is a
conflict. The unique (name, version) constraint settles races between fleet
processes; the loser re-reads and answers no-op or conflict like a late push.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

import bundle
from bundle import BundleError, TrustAnchor, VerifiedBundle

from .blobs import BlobStore, Upload
from .db import AssignmentItem, Bundle, Database, Device, DeviceBundle
from .errors import BundleRejected, Conflict, Forbidden, Gone, InvalidRequest, NotFound


def parse_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("@")
    if not sep or not name or not version or len(ref) > 200:
        raise InvalidRequest(f"expected NAME@VERSION, got {ref[:200]!r}")
    return name, version


def bundle_view(b: Bundle, *, full: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "name": b.name, "version": b.version, "ref": f"{b.name}@{b.version}", "release": b.release,
        "digest": b.digest, "archive_sha256": b.archive_sha256, "size": b.size, "signer": b.signer,
        "pushed_at": b.pushed_at, "revoked": b.revoked_at is not None, "revoked_at": b.revoked_at,
        "revoke_reason": b.revoke_reason,
        "models": [m.get("name") for m in b.manifest.get("models", [])],
    }
    if full:
        view["manifest"] = b.manifest
    return view


def _unpack_and_verify(archive: pathlib.Path, staging: pathlib.Path, trust: Sequence[TrustAnchor],
                       max_unpacked_bytes: int) -> VerifiedBundle:
    out = staging / "bundle"
    bundle.unpack(archive, out, max_bytes=max_unpacked_bytes)
    return bundle.verify(out, trust)


class BundleStore:
    def __init__(self, db: Database, blobs: BlobStore, trust: Sequence[TrustAnchor],
                 max_unpacked_bytes: int) -> None:
        self.db = db
        self.blobs = blobs
        self.trust = list(trust)
        self.max_unpacked_bytes = max_unpacked_bytes

    async def push(self, upload: Upload, archive_sha256: str, pushed_by: str) -> tuple[dict[str, Any], bool]:
        """Verify and store an uploaded archive; returns (bundle view, created)."""
        try:
            verified = await self._verify(upload.path)
            existing = await self._find(verified.manifest.name, verified.manifest.version)
            if existing is not None:
                return self._same_or_conflict(existing, verified), False
            self.blobs.commit(upload, archive_sha256)
        finally:
            upload.discard()
        row = Bundle(name=verified.manifest.name, version=verified.manifest.version,
                     release=verified.manifest.release, digest=verified.digest, archive_sha256=archive_sha256,
                     size=upload.size, signer=verified.signer[:200], manifest=verified.manifest.to_dict(),
                     pushed_at=time.time(), pushed_by=pushed_by)
        try:
            async with self.db.transaction() as s:
                s.add(row)
        except IntegrityError:
            existing = await self._find(row.name, row.version)
            if existing is None:
                raise
            if existing.archive_sha256 != archive_sha256:
                # Lost a race: our blob was committed for a row that will never exist. Only a
                # row of this same name@version could name these bytes, and that row is the
                # winner's, so nothing can come to reference the blob later.
                await self._collect_if_unreferenced(archive_sha256)
            return self._same_or_conflict(existing, verified), False
        return bundle_view(row), True

    async def _collect_if_unreferenced(self, archive_sha256: str) -> None:
        async with self.db.read() as s:
            used = (await s.execute(select(Bundle.id).where(Bundle.archive_sha256 == archive_sha256)
                                    .limit(1))).first()
        if used is None:
            await asyncio.to_thread(self.blobs.delete, archive_sha256)

    async def collect_garbage(self, older_than_s: float = 3600.0) -> int:
        """Delete blobs no bundle row references (a process that died between committing the
        blob and inserting its row); returns how many. Young blobs are left alone: they may
        belong to a push whose row is being inserted right now."""
        candidates = await asyncio.to_thread(self.blobs.digests, time.time() - older_than_s)
        if not candidates:
            return 0
        async with self.db.read() as s:
            referenced = set((await s.execute(select(Bundle.archive_sha256)
                                              .where(Bundle.archive_sha256.in_(candidates)))).scalars())
        garbage = [d for d in candidates if d not in referenced]
        for digest in garbage:
            await asyncio.to_thread(self.blobs.delete, digest)
        return len(garbage)

    async def _verify(self, archive: pathlib.Path) -> VerifiedBundle:
        if not self.trust:
            raise BundleRejected("", "the fleet trusts no release key (start it with --trust KEY.pub)")
        staging = pathlib.Path(tempfile.mkdtemp(prefix="staging-", dir=self.blobs.scratch_dir()))
        try:
            return await asyncio.to_thread(_unpack_and_verify, archive, staging, self.trust,
                                           self.max_unpacked_bytes)
        except BundleError as e:
            raise BundleRejected(_relative(e.path, staging, archive), e.reason) from None
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)

    @staticmethod
    def _same_or_conflict(existing: Bundle, verified: VerifiedBundle) -> dict[str, Any]:
        if existing.digest != verified.digest:
            raise Conflict(f"{existing.name}@{existing.version} already exists with different content "
                           "(versions are immutable; push a new version)")
        return bundle_view(existing)

    async def _find(self, name: str, version: str) -> Bundle | None:
        async with self.db.read() as s:
            return (await s.execute(select(Bundle).where(Bundle.name == name, Bundle.version == version))).scalar()

    async def get(self, name: str, version: str) -> Bundle:
        b = await self._find(name, version)
        if b is None:
            raise NotFound(f"no bundle {name}@{version}")
        return b

    async def list_versions(self, name: str | None = None) -> list[dict[str, Any]]:
        q = select(Bundle).order_by(Bundle.name, Bundle.pushed_at)
        if name:
            q = q.where(Bundle.name == name)
        async with self.db.read() as s:
            return [bundle_view(b) for b in (await s.execute(q)).scalars()]

    async def for_download(self, name: str, version: str, device_id: str | None) -> tuple[Bundle, pathlib.Path]:
        """Operators may fetch anything; a device only what is assigned to it and not revoked."""
        b = await self.get(name, version)
        if device_id is not None:
            async with self.db.read() as s:
                assigned = (await s.execute(select(AssignmentItem).where(
                    AssignmentItem.device_id == device_id, AssignmentItem.bundle_id == b.id))).first()
            if assigned is None:
                raise Forbidden(f"{name}@{version} is not assigned to this device")
            if b.revoked_at is not None:
                raise Gone(f"{name}@{version} is revoked: {b.revoke_reason or 'no reason given'}")
        return b, self.blobs.path(b.archive_sha256)

    async def revoke(self, name: str, version: str, reason: str) -> tuple[dict[str, Any], list[str]]:
        """Mark revoked and bump the assignment serial of every device that has or runs it.

        Returns (bundle view, ids of the devices told).
        """
        now = time.time()
        async with self.db.transaction() as s:
            b = (await s.execute(select(Bundle).where(Bundle.name == name, Bundle.version == version)
                                 .with_for_update())).scalar()
            if b is None:
                raise NotFound(f"no bundle {name}@{version}")
            if b.revoked_at is None:
                b.revoked_at, b.revoke_reason = now, reason[:1000]
            assigned = select(AssignmentItem.device_id).where(AssignmentItem.bundle_id == b.id)
            running = select(DeviceBundle.device_id).where(DeviceBundle.ref == f"{name}@{version}")
            result = await s.execute(
                update(Device).where(Device.id.in_(assigned.union(running).scalar_subquery()))
                .values(assignment_serial=Device.assignment_serial + 1, assignment_changed_at=now)
                .returning(Device.id))
            told = list(result.scalars())
        return bundle_view(b), told


def _relative(path: str, staging: pathlib.Path, archive: pathlib.Path) -> str:
    """Name files inside the bundle, never the server's own directories."""
    for root in (str(staging / "bundle"), str(staging)):
        if path.startswith(root):
            return path[len(root):].lstrip(os.sep) or "."
    return "archive" if path == str(archive) or path.startswith(str(archive.parent)) else os.path.basename(path)
