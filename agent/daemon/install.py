"""Verified, read-only installs: from an archive to the agent's own copy of a bundle.

An archive (already hash-checked by the download) is unpacked into staging,
verified against the trusted publisher keys (signature first, then every
file's hash and the manifest), checked against what the assignment promised
(name, version, digest), the anti-rollback floor and this device's hardware,
then made read-only (files 0444, directories 0555, every file fsynced) and
renamed into `installs/<name>/<version>-<digest>`. Only that copy is ever
read afterwards: engines are built from it. A crash at any point leaves
either no install or a complete one (the rename is the commit); staging is
swept at the next start.

Release numbers are the anti-rollback epoch (as Android's rollback index):
the floor is the highest release committed on this device, a bundle below it
is refused, and versions within one release may be switched freely (so the
fleet can send a device back to an earlier version of the same epoch).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import bundle
from bundle import BundleError, Manifest, VerifiedBundle, fsync_dir
from contract import BundleConstraints
from engines import HardwareInfo

from .errors import UpdateRefused
from .preflight import check_constraints
from .state import Installed


@dataclass(frozen=True)
class Expected:
    """What the signed assignment says the archive holds; None fields are not checked (air-gapped import)."""

    name: str | None = None
    version: str | None = None
    digest: str | None = None


def check_disk(path: pathlib.Path, need_bytes: int, margin_bytes: int) -> None:
    """Refuse early when the download and its unpacked copy cannot fit (THREATS #20)."""
    free = shutil.disk_usage(path).free
    if free < need_bytes + margin_bytes:
        raise UpdateRefused("preflight", f"needs {need_bytes + margin_bytes} bytes free (bundle {need_bytes} + "
                                        f"margin {margin_bytes}); {free} free on {path}", permanent=False)


def check_hardware(manifest: Manifest, hw: HardwareInfo) -> None:
    """The verified manifest's constraints against this device (the same check as before the download)."""
    c = manifest.constraints
    check_constraints(manifest.ref, BundleConstraints(c.architectures, c.min_compute_capability,
                                                      tuple(manifest.serving.engines)), hw)


def _make_read_only(root: pathlib.Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(p, 0o444)
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o555)
        fsync_dir(dirpath)
    os.chmod(root, 0o555)


def remove_tree(path: pathlib.Path) -> None:
    """rmtree for read-only installs (directories made writable again first)."""
    if not path.exists():
        return
    for dirpath, _, _ in os.walk(path):
        os.chmod(dirpath, stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)


class Installer:
    def __init__(self, installs_dir: pathlib.Path, staging_dir: pathlib.Path,
                 trusted: Sequence[bundle.TrustAnchor]) -> None:
        self.installs_dir = installs_dir
        self.staging_dir = staging_dir
        self.trusted = list(trusted)
        for d in (installs_dir, staging_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def sweep_staging(self) -> None:
        """Leftovers of an install a crash interrupted: never used, removed at start."""
        for child in self.staging_dir.iterdir():
            remove_tree(child) if child.is_dir() else child.unlink(missing_ok=True)

    def discard(self, path: pathlib.Path) -> None:
        """Remove an install: renamed into staging first (atomic), so a kill mid-removal never leaves a
        half-deleted directory under an install's name; staging is swept at the next start."""
        if not path.exists():
            return
        trash = pathlib.Path(tempfile.mkdtemp(prefix="discard-", dir=self.staging_dir))
        os.replace(path, trash / path.name)
        fsync_dir(path.parent)
        remove_tree(trash)

    def target(self, name: str, version: str, digest: str) -> pathlib.Path:
        return self.installs_dir / name / f"{version}-{digest[:16]}"

    def verify(self, path: pathlib.Path, step: str = "verify") -> VerifiedBundle:
        try:
            return bundle.verify(path, self.trusted, isolate_signature=True)
        except BundleError as e:
            raise UpdateRefused(step, str(e)) from e

    def open_installed(self, inst: Installed) -> VerifiedBundle:
        """Re-verify an install before loading it (at start, on a switch back): the copy must still be intact."""
        vb = self.verify(pathlib.Path(inst.path))
        if vb.digest != inst.digest:
            raise UpdateRefused("verify", f"install {inst.path} changed: digest {vb.digest[:16]} is not "
                                          f"{inst.digest[:16]}")
        return vb

    def install(self, archive: pathlib.Path, archive_sha256: str, expected: Expected, floor: int,
                hw: HardwareInfo) -> tuple[VerifiedBundle, Installed]:
        """Unpack, verify, check, make read-only and commit (blocking: run it off the event loop)."""
        staging = pathlib.Path(tempfile.mkdtemp(prefix="install-", dir=self.staging_dir))
        unpacked = staging / "bundle"
        try:
            try:
                bundle.unpack(archive, unpacked)
            except BundleError as e:
                raise UpdateRefused("verify", f"archive refused: {e}") from e
            vb = self.verify(unpacked)
            m = vb.manifest
            for what, want, got in (("name", expected.name, m.name), ("version", expected.version, m.version),
                                    ("digest", expected.digest, vb.digest)):
                if want is not None and want != got:
                    raise UpdateRefused("verify", f"the signed bundle's {what} is {got[:80]!r}, the assignment "
                                                  f"says {want[:80]!r} (mix-and-match refused)")
            if m.release < floor:
                raise UpdateRefused("verify", f"{m.ref} has release {m.release}, below this device's "
                                              f"anti-rollback floor {floor} for {m.name}")
            check_hardware(m, hw)
            target = self.target(m.name, m.version, vb.digest)
            installed = Installed(m.version, m.release, vb.digest, archive_sha256, str(target))
            if target.exists():  # an earlier install of the same digest: use it if it is still intact
                try:
                    return self.open_installed(installed), installed
                except UpdateRefused:
                    self.discard(target)  # damaged since: replaced by the copy just verified
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _make_read_only(unpacked)
            os.replace(unpacked, target)
            fsync_dir(target.parent)
            return dataclasses.replace(vb, root=target), installed
        finally:
            remove_tree(staging)
