"""The single-file form of a bundle: a tar archive (optionally gzip-compressed).

`pack` is reproducible: members sorted, owners and times normalised, so the
same bundle always packs to the same bytes (and the same sha256 in the fleet's
content-addressed store). `unpack` treats the archive as hostile: it streams,
refuses the whole archive on the first unsafe member (absolute path, `..`,
link, device, duplicate), caps the bytes it will read from the (decompressed)
stream, and writes only into a fresh staging directory that is renamed into
place when everything went well. Verification happens afterwards, on the
unpacked directory; unpacking never trusts anything.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import stat
import tarfile
from typing import IO, cast

from .errors import ArchiveError, ArchiveTooLarge, BundleError, BundleNotFound, UnsafeArchiveMember
from .fsutil import CHUNK_BYTES, atomic_writer, staged_directory

DEFAULT_MAX_BYTES = 64 << 30
DEFAULT_MAX_MEMBERS = 10_000
#: tar headers, padding and pax records on top of the file contents
_OVERHEAD_BYTES = 16 << 20
_GZIP_MAGIC = b"\x1f\x8b"


def pack(bundle_dir: str | os.PathLike[str], out_file: str | os.PathLike[str]) -> pathlib.Path:
    """Pack a bundle directory; `.gz`/`.tgz` names are gzip-compressed."""
    root = pathlib.Path(bundle_dir)
    if not root.is_dir():
        raise BundleNotFound(str(root), "no bundle directory here")
    out = pathlib.Path(out_file)
    members: list[pathlib.Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = pathlib.Path(dirpath, name)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeArchiveMember(str(p), "only regular files can be packed (symlink or special file found)")
            members.append(p)
    members.sort(key=lambda p: p.relative_to(root).as_posix())
    compress = out.name.endswith((".gz", ".tgz"))
    with atomic_writer(out) as raw:
        stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)) if compress else raw
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for p in members:
                info = tar.gettarinfo(str(p), arcname=p.relative_to(root).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                info.mode = 0o644
                with open(p, "rb") as f:
                    tar.addfile(info, f)
        if compress:
            stream.close()
    return out


class _CappedReader(io.RawIOBase):
    """Refuses to hand out more than `limit` bytes: bounds bombs of every kind."""

    def __init__(self, inner: IO[bytes], limit: int, origin: str) -> None:
        self._inner, self._left, self._origin = inner, limit, origin
        self._limit = limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(min(len(b), self._left + 1))
        if len(data) > self._left:
            raise ArchiveTooLarge(self._origin, f"archive expands past the {self._limit}-byte limit")
        self._left -= len(data)
        b[: len(data)] = data
        return len(data)


def _safe_name(name: str, archive: str) -> str:
    if not name or "\x00" in name or "\\" in name:
        raise UnsafeArchiveMember(archive, f"member {name!r} has an invalid name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveMember(archive, f"member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveMember(archive, f"member {name!r} climbs out of the bundle with '..'")
    if not parts:
        raise UnsafeArchiveMember(archive, f"member {name!r} has an empty path")
    return "/".join(parts)


def _check_type(member: tarfile.TarInfo, archive: str) -> None:
    if member.issym():
        raise UnsafeArchiveMember(archive, f"member {member.name!r} is a symbolic link (to {member.linkname!r})")
    if member.islnk():
        raise UnsafeArchiveMember(archive, f"member {member.name!r} is a hard link (to {member.linkname!r})")
    if member.ischr() or member.isblk():
        raise UnsafeArchiveMember(archive, f"member {member.name!r} is a device node")
    if member.isfifo():
        raise UnsafeArchiveMember(archive, f"member {member.name!r} is a FIFO")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveMember(archive, f"member {member.name!r} has unsupported type {member.type!r}")


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: pathlib.Path) -> None:
    src = tar.extractfile(member)
    if src is None:
        raise ArchiveError(str(dest), "member has no data")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(CHUNK_BYTES):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _extract_all(stream: IO[bytes], staging: pathlib.Path, origin: str, max_bytes: int, max_members: int) -> set[str]:
    total, seen = 0, set[str]()
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for count, member in enumerate(tar, start=1):
            if count > max_members:
                raise ArchiveTooLarge(origin, f"more than {max_members} members")
            name = _safe_name(member.name, origin)
            _check_type(member, origin)
            if name in seen:
                raise UnsafeArchiveMember(origin, f"member {name!r} appears twice")
            seen.add(name)
            if member.isdir():
                (staging / name).mkdir(parents=True, exist_ok=True)
                continue
            total += member.size
            if total > max_bytes:
                raise ArchiveTooLarge(origin, f"members expand past the {max_bytes}-byte limit")
            _extract_file(tar, member, staging / name)
    return seen


def unpack(archive: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
           max_bytes: int = DEFAULT_MAX_BYTES, max_members: int = DEFAULT_MAX_MEMBERS) -> pathlib.Path:
    """Extract `archive` into the new directory `out_dir`, refusing anything unsafe."""
    src = pathlib.Path(archive)
    origin = str(src)
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(str(out), "output directory exists and is not empty")
    try:
        raw = open(src, "rb")  # noqa: SIM115 (closed below, after tarfile)
    except FileNotFoundError:
        raise BundleNotFound(origin, "no such archive") from None
    with raw, staged_directory(out) as staging:
        stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")) if raw.read(2) == _GZIP_MAGIC else raw
        raw.seek(0)
        capped = io.BufferedReader(_CappedReader(stream, max_bytes + _OVERHEAD_BYTES, origin), CHUNK_BYTES)
        try:
            seen = _extract_all(capped, staging, origin, max_bytes, max_members)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as e:
            if isinstance(e, BundleError):
                raise
            raise ArchiveError(origin, f"not a readable bundle archive: {e}") from None
        if not seen:
            raise ArchiveError(origin, "the archive is empty")
    return out
