"""The on-disk engine cache: built engines that survive restarts, keyed to what they were built for.

Layout under the cache root:

    entries/<backend>-<digest>/   one committed entry: the backend's artifacts + entry.json
    staging/<backend>-<digest>.*  builds in progress (never loaded)
    locks/<backend>-<digest>.lock one lock per key: two processes never build the same entry

The key (`CacheKey`) is model sha256 (and external data's) x backend x precision x shape profile x
build options x GPU model and compute capability x runtime versions; its
digest names the directory, and `entry.json` repeats the whole key, which a
lookup compares field by field, so an entry made for another GPU or runtime
is never loaded even if a directory was copied or renamed. `entry.json` also
records `built_from`, the sha256 of the model bytes the build actually read
(THREATS #12), and a lookup refuses an entry whose record is not the key's.

Crash safety (THREATS #18): a build writes into a staging directory; commit
fsyncs every file, writes `entry.json` (the file list with sizes and sha256)
atomically, fsyncs the directory and renames it into `entries/`, then fsyncs
`entries/`. A kill at any point leaves either no entry or a complete one; a
stale staging directory is removed by the next eviction pass. A lookup
re-hashes every listed file, so a corrupt or truncated entry is a miss (and
is rebuilt), never a load.

Size bound: after each commit, least-recently-used entries (by the mtime of
their `entry.json`, refreshed on every hit) are removed until the cache fits
in `max_bytes`; an entry whose key lock is held is left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import filelock

from bundle import atomic_write_bytes, fsync_dir, sha256_file

from .errors import BuildTimeout, CacheError

ENTRY_META = "entry.json"
#: 2: entries record `built_from` (the sha256 of the model files they were built from); format-1
#: entries predate that check and are rebuilt
FORMAT = 2
DEFAULT_MAX_BYTES = 8 << 30
_MAX_META_BYTES = 1 << 20


@dataclass(frozen=True)
class CacheKey:
    model_sha256: str
    backend: str
    precision: str
    #: [[dim, min, opt, max], ...]
    profile: tuple[tuple[object, ...], ...]
    #: build-affecting options, canonical JSON
    options: str
    gpu: str | None
    compute_capability: str | None
    #: sorted (runtime, version) pairs: onnxruntime, tensorrt, cuda, driver, cpu...
    runtimes: tuple[tuple[str, str | None], ...]
    #: sha256 of the model's external-data files, sorted (weights can change under an identical graph)
    data_sha256: tuple[str, ...] = ()

    @property
    def sources(self) -> frozenset[str]:
        """Every digest an entry for this key must have been built from."""
        return frozenset((self.model_sha256, *self.data_sha256))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # type: ignore[no-any-return]

    @property
    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.digest[:40]}"


@dataclass(frozen=True)
class Lookup:
    """A verified entry (`path` set) or a miss with the reason (None when simply absent)."""

    path: pathlib.Path | None
    reason: str | None = None
    meta: dict[str, Any] | None = None

    @property
    def hit(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class EntryInfo:
    name: str
    path: pathlib.Path
    size_bytes: int
    last_used: float


class EngineCache:
    def __init__(self, root: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = pathlib.Path(root).absolute()
        self.max_bytes = max_bytes
        self.entries_dir = self.root / "entries"
        self.staging_dir = self.root / "staging"
        self.locks_dir = self.root / "locks"
        try:
            for d in (self.entries_dir, self.staging_dir, self.locks_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"engine cache {self.root} is not usable: {e}") from e

    # -- lookup --------------------------------------------------------------------------
    def entry_path(self, key: CacheKey) -> pathlib.Path:
        return self.entries_dir / key.name

    def lookup(self, key: CacheKey) -> Lookup:
        path = self.entry_path(key)
        if not path.is_dir():
            return Lookup(None)
        meta_path = path / ENTRY_META
        try:
            with open(meta_path, "rb") as f:
                raw = f.read(_MAX_META_BYTES + 1)
            meta = json.loads(raw)
        except (OSError, ValueError) as e:
            return Lookup(None, f"entry has no readable {ENTRY_META}: {e}")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            return Lookup(None, "entry has an unknown format")
        stored = meta.get("key")
        if stored != key.to_dict():
            fields = sorted(k for k, v in key.to_dict().items() if not isinstance(stored, dict) or stored.get(k) != v)
            return Lookup(None, f"entry was built for another {', '.join(fields) or 'key'}; not loading it")
        built = meta.get("built_from")
        if not isinstance(built, dict) or set(built.values()) != key.sources:
            return Lookup(None, "entry does not record being built from this model's verified bytes; not loading it")
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            return Lookup(None, "entry lists no files")
        for rel, info in files.items():
            reason = self._check_file(path, rel, info)
            if reason:
                return Lookup(None, reason)
        return Lookup(path, None, meta)

    def _check_file(self, entry: pathlib.Path, rel: str, info: Any) -> str | None:
        full = (entry / rel).resolve()
        if entry.resolve() not in full.parents:
            return f"entry lists a file outside itself: {rel}"
        try:
            size = full.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != info.get("size"):
            return f"{rel} is {size} bytes, {info.get('size')} expected (truncated or replaced)"
        digest, _ = sha256_file(full, size)
        if digest != info.get("sha256"):
            return f"{rel} does not match its sha256 (corrupted)"
        return None

    def touch(self, path: pathlib.Path) -> None:
        """Record a use, for LRU eviction (the mtime only: the content, and so the hash, stay)."""
        with contextlib.suppress(OSError):
            os.utime(path / ENTRY_META)

    # -- build -------------------------------------------------------------------------
    def lock(self, key: CacheKey, timeout_s: float = -1) -> filelock.BaseFileLock:
        return filelock.FileLock(str(self.locks_dir / f"{key.name}.lock"), timeout=timeout_s)

    @contextlib.contextmanager
    def building(self, key: CacheKey, timeout_s: float) -> Iterator[None]:
        """Hold the key's lock for a build; waiting longer than `timeout_s` is a `BuildTimeout`."""
        try:
            with self.lock(key, timeout_s):
                yield
        except filelock.Timeout:
            raise BuildTimeout(f"another process has been building {key.name} for over {timeout_s:g} s") from None

    @contextlib.contextmanager
    def staging(self, key: CacheKey) -> Iterator[pathlib.Path]:
        """A fresh directory to build into; removed unless committed."""
        path = pathlib.Path(tempfile.mkdtemp(prefix=f"{key.name}.", dir=self.staging_dir))
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, staging: pathlib.Path, key: CacheKey, build: dict[str, Any] | None = None, *,
               built_from: Mapping[str, str]) -> pathlib.Path:
        """Seal `staging` as the entry for `key` (the caller holds the key's lock).

        `built_from` maps each model file the build read to the sha256 of the bytes it read;
        they must be the key's digests, and every lookup checks them again.
        """
        if set(built_from.values()) != key.sources:
            raise CacheError(f"the {key.backend} build read model bytes other than the verified ones "
                             f"({sorted(built_from.values())} for {sorted(key.sources)}); not caching it")
        try:
            return self._commit(staging, key, build, dict(built_from))
        except OSError as e:  # disk full, read-only file system: the staging dir is the caller's to drop
            raise CacheError(f"cannot write engine cache entry {key.name}: {e}") from e

    def _commit(self, staging: pathlib.Path, key: CacheKey, build: dict[str, Any] | None,
                built_from: dict[str, str]) -> pathlib.Path:
        files: dict[str, dict[str, Any]] = {}
        for full in sorted(p for p in staging.rglob("*") if p.is_file()):
            with open(full, "rb+") as f:
                os.fsync(f.fileno())
            digest, size = sha256_file(full)
            files[full.relative_to(staging).as_posix()] = {"sha256": digest, "size": size}
        for d in sorted({p.parent for p in staging.rglob("*")} | {staging}, key=lambda p: -len(p.parts)):
            fsync_dir(d)
        if not files:
            raise CacheError(f"the {key.backend} build wrote nothing to cache")
        meta = {"format": FORMAT, "key": key.to_dict(), "built_from": built_from, "files": files,
                "created": time.time(), "build": build or {}}
        atomic_write_bytes(staging / ENTRY_META, json.dumps(meta, indent=1, sort_keys=True).encode())
        target = self.entry_path(key)
        if target.exists():
            self._remove_dir(target)
        os.replace(staging, target)
        fsync_dir(self.entries_dir)
        return target

    def remove(self, key: CacheKey) -> None:
        path = self.entry_path(key)
        if path.exists():
            self._remove_dir(path)

    def _remove_dir(self, path: pathlib.Path) -> None:
        """Move out of `entries/` in one rename (readers see it or not), then delete."""
        trash = pathlib.Path(tempfile.mkdtemp(prefix="trash.", dir=self.staging_dir))
        os.replace(path, trash / path.name)
        fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    # -- size bound --------------------------------------------------------------------
    def entries(self) -> list[EntryInfo]:
        out = []
        for path in self.entries_dir.iterdir():
            try:
                if not path.is_dir():
                    continue
                size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            except OSError:  # removed by another process while we looked
                continue
            try:
                used = (path / ENTRY_META).stat().st_mtime
            except OSError:
                used = 0.0
            out.append(EntryInfo(path.name, path, size, used))
        return sorted(out, key=lambda e: e.last_used)

    def total_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries())

    def evict(self, keep: CacheKey | None = None) -> list[str]:
        """Drop least-recently-used entries until the cache fits; returns the names removed."""
        self._clean_staging()
        entries = self.entries()
        total = sum(e.size_bytes for e in entries)
        removed: list[str] = []
        for e in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and e.name == keep.name:
                continue
            lock = filelock.FileLock(str(self.locks_dir / f"{e.name}.lock"), timeout=0)
            try:
                with lock:
                    self._remove_dir(e.path)
            except filelock.Timeout:
                continue  # being built or rebuilt right now
            total -= e.size_bytes
            removed.append(e.name)
        return removed

    def _clean_staging(self) -> None:
        """Remove builds that no process is running any more (killed mid-build)."""
        for path in self.staging_dir.iterdir():
            name = path.name.split(".", 1)[0]
            if path.name.startswith("trash."):
                shutil.rmtree(path, ignore_errors=True)
                continue
            lock = filelock.FileLock(str(self.locks_dir / f"{name}.lock"), timeout=0)
            try:
                with lock:
                    shutil.rmtree(path, ignore_errors=True)
            except filelock.Timeout:
                continue
