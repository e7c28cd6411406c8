"""Bundle downloads into a content-addressed store: resumable, capped, stall-guarded, verified.

A blob lives at ``ROOT/blobs/sha256/<hex>`` only once its bytes hash to
``<hex>``; it gets there from ``ROOT/staging/<hex>.part`` by fsync + rename +
fsync of the directory, so a crash never leaves a partial file under a hash
name, and a blob already present (and still hash-correct) is never fetched
again. The staging file survives interruptions, including kill -9: the next
try asks for the rest with ``Range: bytes=N-`` and ``If-Range: "<hex>"`` (the
fleet's ETag is the archive's sha256), so a changed file on the fleet side
comes back whole instead of being spliced.

While streaming, a download is refused the moment it passes the declared
size (THREATS 2); it fails as stalled when no byte arrives for
`chunk_timeout_s` or fewer than `min_rate_bytes_per_s` arrive over a
`rate_window_s` window (THREATS 25). Retryable failures (link lost, stall,
fleet 5xx/429) are retried up to `attempts` times with exponential backoff
and full jitter; refusals (size, hash, 4xx) are not. A hash mismatch removes
the staging file: those bytes are never trusted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import pathlib
import random
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bundle import fsync_dir
from runtime import Backoff
from runtime.timeouts import timeout

from .fleet_errors import (
    DownloadError,
    DownloadHashMismatch,
    DownloadStalled,
    DownloadTooLarge,
    FleetRejected,
    FleetUnreachable,
)

if TYPE_CHECKING:  # the client imports this module lazily
    from .fleet_client import HttpResponse

log = logging.getLogger(__name__)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class DownloadPolicy:
    attempts: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    request_timeout_s: float = 30.0
    chunk_timeout_s: float = 30.0
    min_rate_bytes_per_s: float = 1024.0
    rate_window_s: float = 30.0


class Fetcher(Protocol):
    """What a download needs from the fleet client: an authenticated, streamed GET."""

    async def get(self, path: str, headers: Mapping[str, str] | None = None,
                  timeout_s: float | None = None) -> HttpResponse: ...


class BlobStore:
    """Content-addressed archives under `root`; staging beside them on the same file system."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = pathlib.Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.staging = self.root / "staging"

    def path(self, sha256: str) -> pathlib.Path:
        return self.blobs / _checked_hex(sha256)

    def staging_path(self, sha256: str) -> pathlib.Path:
        return self.staging / f"{_checked_hex(sha256)}.part"

    def ensure(self) -> None:
        for d in (self.blobs, self.staging):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def present(self, sha256: str) -> pathlib.Path | None:
        """The blob if it is there and its bytes still hash to its name; a corrupt one is removed."""
        path = self.path(sha256)
        if not path.is_file():
            return None
        if _sha256_file(path).hexdigest() == sha256:
            return path
        log.warning("blob %s is corrupt on disk; removing it and fetching again", sha256[:16])
        path.unlink(missing_ok=True)
        return None

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
        self.staging_path(sha256).unlink(missing_ok=True)


def _checked_hex(sha256: str) -> str:
    if not _HEX64.match(sha256):
        raise DownloadError(f"not a sha256 hex digest: {sha256[:80]!r}")
    return sha256


def _sha256_file(path: pathlib.Path, limit: int | None = None) -> hashlib._Hash:
    h = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            chunk = f.read(HASH_CHUNK_BYTES if remaining is None else min(HASH_CHUNK_BYTES, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return h


class _Restart(Exception):
    """The fleet ignored or refused our range: start over from byte 0 on the next try (not an error)."""


@dataclass
class _Progress:
    offset: int
    hasher: hashlib._Hash


async def fetch_blob(fetcher: Fetcher, url: str, store: BlobStore | str | os.PathLike[str], expected_sha256: str,
                     size: int, policy: DownloadPolicy | None = None, *, rng: random.Random | None = None,
                     sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> pathlib.Path:
    """Return the path of the verified blob `expected_sha256`, downloading from `url` only what is missing."""
    policy = policy or DownloadPolicy()
    blobs = store if isinstance(store, BlobStore) else BlobStore(store)
    expected_sha256 = _checked_hex(expected_sha256.lower())
    if size < 0:
        raise DownloadError(f"{url}: negative declared size")
    blobs.ensure()
    async with _lock_for(blobs.path(expected_sha256)):
        present = await asyncio.to_thread(blobs.present, expected_sha256)
        if present is not None:
            return present
        return await _fetch(fetcher, url, blobs, expected_sha256, size, policy, rng, sleep)


_LOCKS: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def _lock_for(path: pathlib.Path) -> asyncio.Lock:
    """One download of a blob at a time in this process: two would write one staging file."""
    key = str(path.absolute())
    lock = _LOCKS.get(key)
    if lock is None:
        lock = _LOCKS[key] = asyncio.Lock()
    return lock


async def _fetch(fetcher: Fetcher, url: str, blobs: BlobStore, expected_sha256: str, size: int,
                 policy: DownloadPolicy, rng: random.Random | None,
                 sleep: Callable[[float], Awaitable[None]]) -> pathlib.Path:
    part = blobs.staging_path(expected_sha256)
    progress = await asyncio.to_thread(_resume_point, part, size)
    # Bytes left by an earlier run are only a guess until the whole file hashes right: if it
    # does not, they may be the culprit, so start over once from zero before refusing.
    inherited = progress.offset > 0
    last: Exception | None = None
    backoff = Backoff(policy.backoff_base_s, policy.backoff_max_s)
    for attempt in range(max(1, policy.attempts)):
        if attempt:
            delay = backoff.delay_s(attempt - 1, (rng or random).random)
            log.info("download %s: try %d in %.1f s after: %s", url, attempt + 1, delay, last)
            await sleep(delay)
        try:
            if progress.offset < size:
                await _one_try(fetcher, url, part, expected_sha256, size, policy, progress)
            return await asyncio.to_thread(_finalize, blobs, part, url, expected_sha256, size, progress)
        except _Restart:
            progress = _Progress(0, hashlib.sha256())
            last = None
        except DownloadHashMismatch as e:
            part.unlink(missing_ok=True)
            if not inherited:
                raise
            log.warning("download %s: resumed bytes did not verify; fetching it whole", url)
            inherited, last = False, e
            progress = _Progress(0, hashlib.sha256())
        except (FleetUnreachable, DownloadStalled) as e:
            last = e
        except FleetRejected as e:
            if not e.retryable:
                raise
            last = e
        except DownloadTooLarge:
            part.unlink(missing_ok=True)
            raise
    raise DownloadError(f"{url}: gave up after {policy.attempts} tries: {last}") from last


def _resume_point(part: pathlib.Path, size: int) -> _Progress:
    """What a staging file left by an earlier try is worth: its bytes re-hashed, or nothing."""
    try:
        have = part.stat().st_size
    except FileNotFoundError:
        return _Progress(0, hashlib.sha256())
    if have > size:
        part.unlink()
        return _Progress(0, hashlib.sha256())
    return _Progress(have, _sha256_file(part, have))


async def _one_try(fetcher: Fetcher, url: str, part: pathlib.Path, sha256: str, size: int,
                   policy: DownloadPolicy, progress: _Progress) -> None:
    headers = {"Accept-Encoding": "identity"}
    if progress.offset:
        headers.update({"Range": f"bytes={progress.offset}-", "If-Range": f'"{sha256}"'})
    try:
        resp = await fetcher.get(url, headers, timeout_s=policy.request_timeout_s)
    except FleetRejected as e:
        if e.status == 416 and progress.offset:
            part.unlink(missing_ok=True)
            raise _Restart from None
        raise
    async with resp:
        start = _start_of(resp.status, resp.headers, progress.offset, size, url)
        if start != progress.offset:
            progress.offset, progress.hasher = 0, hashlib.sha256()
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and start + int(declared) > size:
            raise DownloadTooLarge(url, size)
        # Append, or write from the start; the file never holds bytes we have not hashed.
        with open(part, "r+b" if progress.offset else "wb") as f:
            f.truncate(progress.offset)
            f.seek(progress.offset)
            try:
                async for chunk in _guarded(resp.body, policy, url):
                    if progress.offset + len(chunk) > size:
                        raise DownloadTooLarge(url, size)
                    f.write(chunk)
                    progress.hasher.update(chunk)
                    progress.offset += len(chunk)
            finally:
                f.flush()
    if progress.offset < size:
        raise FleetUnreachable(f"{url}: connection closed after {progress.offset} of {size} bytes")


def _start_of(status: int, headers: Mapping[str, str], offset: int, size: int, url: str) -> int:
    if status == 200:
        return 0
    if status == 206:
        m = _CONTENT_RANGE.match(headers.get("content-range", ""))
        if m is None:
            raise _Restart
        start, total = int(m.group(1)), m.group(3)
        if total != "*" and int(total) != size:
            raise DownloadTooLarge(url, size) if int(total) > size else DownloadError(
                f"{url}: the fleet has {total} bytes, the assignment declares {size}")
        if start != offset:
            raise _Restart
        return start
    raise FleetRejected(status, f"unexpected status for {url}")


async def _guarded(body: AsyncIterator[bytes], policy: DownloadPolicy, url: str) -> AsyncIterator[bytes]:
    """The body's chunks, failing as stalled on a silent gap or on a throughput below the floor."""
    it = body.__aiter__()
    window_start, window_bytes = time.monotonic(), 0
    while True:
        try:
            async with timeout(policy.chunk_timeout_s):
                chunk = await it.__anext__()
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise DownloadStalled(f"{url}: no byte for {policy.chunk_timeout_s:g} s") from None
        window_bytes += len(chunk)
        elapsed = time.monotonic() - window_start
        if elapsed >= policy.rate_window_s:
            rate = window_bytes / elapsed
            if rate < policy.min_rate_bytes_per_s:
                raise DownloadStalled(f"{url}: {rate:.0f} B/s over {elapsed:.0f} s, below the "
                                      f"{policy.min_rate_bytes_per_s:g} B/s floor")
            window_start, window_bytes = time.monotonic(), 0
        yield chunk


def _finalize(blobs: BlobStore, part: pathlib.Path, url: str, sha256: str, size: int,
              progress: _Progress) -> pathlib.Path:
    """Check the hash of exactly `size` bytes, then fsync + rename into the store (+ fsync of its directory)."""
    actual = progress.hasher.hexdigest()
    if progress.offset != size or actual != sha256:
        part.unlink(missing_ok=True)
        raise DownloadHashMismatch(url, sha256, actual)
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(part, 0o444)
    final = blobs.path(sha256)
    os.replace(part, final)
    fsync_dir(final.parent)
    with contextlib.suppress(OSError):
        fsync_dir(part.parent)
    return final
