"""Content-addressed storage of bundle archives.

A blob's name is the sha256 of its bytes, so two fleet processes writing the
same archive write the same file, and a reference in the database can never
point at different bytes later. Uploads go to a private temporary file that is
hashed while it is written; only `commit` makes it visible, by an atomic
rename after fsync. A crash mid-upload leaves at most a temporary file, which
nobody can address and `sweep_temporaries` removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import re
import shutil
import tempfile
import time
from typing import Protocol

from bundle import fsync_dir

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class Upload:
    """A blob being written: bytes go in, its digest comes out."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")  # noqa: SIM115 (closed by finish/discard)

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> str:
        """Flush to disk and return the sha256; the upload is not visible yet."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class BlobStore(Protocol):
    def begin_upload(self) -> Upload: ...

    def commit(self, upload: Upload, digest: str) -> None: ...

    def path(self, digest: str) -> pathlib.Path: ...

    def exists(self, digest: str) -> bool: ...

    def delete(self, digest: str) -> None: ...

    def scratch_dir(self) -> pathlib.Path: ...

    def digests(self, older_than: float) -> list[str]: ...


class LocalBlobStore:
    """Blobs as files under `root/sha256/ab/abcd...`; temporaries under `root/tmp`."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._objects = root / "sha256"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._objects.mkdir(parents=True, exist_ok=True)

    def scratch_dir(self) -> pathlib.Path:
        """Same file system as the blobs, so that commit is a rename."""
        return self._tmp

    def begin_upload(self) -> Upload:
        fd, name = tempfile.mkstemp(prefix="upload-", dir=self._tmp)
        os.close(fd)
        return Upload(pathlib.Path(name))

    def path(self, digest: str) -> pathlib.Path:
        if not _DIGEST.match(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self._objects / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def commit(self, upload: Upload, digest: str) -> None:
        target = self.path(digest)
        if target.is_file():
            upload.discard()
            return
        target.parent.mkdir(exist_ok=True)
        os.chmod(upload.path, 0o444)
        os.replace(upload.path, target)
        fsync_dir(target.parent)

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def digests(self, older_than: float) -> list[str]:
        """Digests of the stored blobs last modified before `older_than` (epoch seconds)."""
        out = []
        for entry in self._objects.glob("??/*"):
            try:
                if _DIGEST.match(entry.name) and entry.lstat().st_mtime < older_than:
                    out.append(entry.name)
            except FileNotFoundError:
                continue
        return out

    def sweep_temporaries(self, older_than_s: float = 24 * 3600) -> int:
        """Remove uploads and staging left by crashed processes; returns how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in self._tmp.iterdir():
            try:
                if entry.lstat().st_mtime >= cutoff:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        return removed
