"""Garbage collection after a commit: installs and archives beyond the retention count.

Kept per bundle name: the active install, the last-known-good one, and the
`retain` most recent others (by modification time); an update in progress is
never touched. An archive (content-addressed blob) goes with the last install
made from it, so a switch back to a kept install needs no download. The
engine cache bounds itself (size, LRU) in `engines.EngineCache`.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterable

from ..download import BlobStore
from .install import Installer
from .state import BundleRecord

log = logging.getLogger(__name__)


def collect(record: BundleRecord, installer: Installer, blobs: BlobStore, retain: int,
            others: Iterable[BundleRecord] = ()) -> list[str]:
    """Remove what `record` no longer needs (mutates `record.archives`); returns what was removed."""
    keep = {pathlib.Path(i.path).name for i in (record.active, record.last_known_good) if i is not None}
    if record.pending is not None:
        keep.add(f"{record.pending.version}-{record.pending.digest[:16]}")
    root = installer.installs_dir / record.name
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and p.name not in keep),
                        key=lambda p: p.stat().st_mtime, reverse=True) if root.is_dir() else []
    removed: list[str] = []
    for path in candidates[max(0, retain):]:
        installer.discard(path)
        removed.append(path.name)
        archive = record.archives.pop(path.name, None)
        still_used = {a for r in (record, *others) for a in r.archives.values()}
        if archive is not None and archive not in still_used:
            blobs.remove(archive)
            removed.append(f"archive {archive[:12]}")
    if removed:
        log.info("gc %s: removed %s", record.name, ", ".join(removed))
    return removed
