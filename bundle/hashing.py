"""Streaming SHA-256: bounded memory whatever the file size."""

from __future__ import annotations

import hashlib
import os

from .fsutil import CHUNK_BYTES


def sha256_file(path: str | os.PathLike[str], expected_size: int | None = None) -> tuple[str, int]:
    """Return (hex digest, bytes read).

    With `expected_size`, reading stops one byte past it: a file that grew
    (or never ends, like a FIFO someone swapped in) is not read to the end.
    """
    h = hashlib.sha256()
    total = 0
    limit = None if expected_size is None else expected_size + 1
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        while True:
            want = CHUNK_BYTES if limit is None else min(CHUNK_BYTES, limit - total)
            if want <= 0:
                break
            n = f.readinto(view[:want])
            if not n:
                break
            h.update(view[:n])
            total += n
    return h.hexdigest(), total


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
