"""Crash-safe file writes shared by every Outpost component.

A reader must see either the old file or the complete new one, never a torn
write, even across kill -9 or a power cut: write a temp file in the same
directory, fsync it, rename over the target, fsync the directory.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

CHUNK_BYTES = 1 << 20


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a file object; on clean exit its content replaces `path` atomically."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    with atomic_writer(path, mode) as f:
        f.write(data)


def copy_file_atomic(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    with open(src, "rb") as fin, atomic_writer(dst) as fout:
        while chunk := fin.read(CHUNK_BYTES):
            fout.write(chunk)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
    """Yield a fresh directory beside `target`; on clean exit it becomes `target`.

    On any error the staging directory is removed and `target` is untouched, so
    a reader never sees a half-built directory. An existing `target` is removed
    just before the rename (callers refuse to replace unless asked to).
    """
    final = pathlib.Path(target).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        os.chmod(staging, 0o755)
        yield staging
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(final.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
