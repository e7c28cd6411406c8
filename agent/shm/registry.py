"""The table of registered shared-memory regions, per owner, and their mappings.

A `Region` maps its object once, read-only, at registration; a writable
mapping is opened only when a request first names the region for an output.
Nothing is unmapped under a reader: unregistering drops the region from the
table and closes its mappings only when no tensor still views them (an
in-flight request keeps its view; the mapping goes with the last view).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pathlib
import stat
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import InvalidRequest

#: where Linux keeps POSIX shared-memory objects (shm_open's namespace)
SHM_DIR = pathlib.Path("/dev/shm")
MAX_NAME_CHARS = 255


class RegionError(InvalidRequest):
    """A region that cannot be registered or used (400): missing, too small, unlinked, not writable."""


@dataclass(eq=False)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    path: pathlib.Path
    identity: tuple[int, int]  # (st_dev, st_ino): the object registered, not whatever has its name now
    readable: mmap.mmap
    #: kept open (read-only) so that each use costs one fstat, not a path lookup
    fd: int
    _writable: mmap.mmap | None = field(default=None, repr=False)
    _view: memoryview | None = field(default=None, repr=False)
    _out: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._view = memoryview(self.readable)

    def input_bytes(self, start: int, stop: int) -> memoryview:
        """Read-only bytes [start, stop) of the object, no copy."""
        if self._view is None:
            raise RegionError(f"shared-memory region {self.name!r} was unregistered")
        return self._view[start:stop]

    def output_bytes(self) -> np.ndarray:
        """The whole window as writable uint8, for `np.copyto` into a slot (opens the writable mapping)."""
        if self._out is None:
            self._out = np.frombuffer(self.writable(), dtype=np.uint8)
        return self._out

    @property
    def end(self) -> int:
        """Bytes of the object the region needs (its window ends here)."""
        return self.offset + self.byte_size

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def check_alive(self) -> None:
        """The object still has this name, is the one registered, and still covers the window."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            raise RegionError(f"shared-memory region {self.name!r} was unregistered") from None
        if st.st_nlink == 0:  # unlinked: our mapping lives on, but the client's object is gone
            if os.path.lexists(self.path):
                raise RegionError(f"shared-memory region {self.name!r}: object {self.key!r} was unlinked and "
                                  "replaced by another; register the new one")
            raise RegionError(f"shared-memory region {self.name!r}: object {self.key!r} was unlinked; "
                              "create and register it again")
        if st.st_size < self.end:
            raise RegionError(f"shared-memory region {self.name!r}: object {self.key!r} shrank to "
                              f"{st.st_size} bytes, the region needs {self.end}")

    def writable(self) -> mmap.mmap:
        """The read-write mapping, opened on first use for an output (the only place the server writes)."""
        if self._writable is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except PermissionError:
                raise RegionError(f"shared-memory region {self.name!r}: the server may read object "
                                  f"{self.key!r} but not write it; use it for inputs only, or give the "
                                  "server's user write access") from None
            except OSError as e:
                raise RegionError(f"shared-memory region {self.name!r}: cannot open {self.key!r} for "
                                  f"writing: {e.strerror}") from None
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != self.identity:
                    raise RegionError(f"shared-memory region {self.name!r}: object {self.key!r} was "
                                      "replaced since it was registered; register it again")
                self._writable = mmap.mmap(fd, self.end, flags=mmap.MAP_SHARED,
                                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        return self._writable

    def release(self) -> None:
        """Unmap now unless a tensor still views the mapping (then the last view unmaps it)."""
        view, self._view, self._out = self._view, None, None
        if view is not None:
            view.release()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        for m in (self.readable, self._writable):
            if m is not None:
                with contextlib.suppress(BufferError):
                    m.close()


def object_path(key: str) -> pathlib.Path:
    """/dev/shm/<key> for a shm_open-style key ("/cam0" or "cam0"); never anywhere else."""
    name = key[1:] if key.startswith("/") else key
    if (not name or len(name) > MAX_NAME_CHARS or "/" in name or "\0" in name
            or name in (".", "..")):
        raise RegionError(f"shared-memory key {key!r} must be one name such as '/cam0' "
                          f"(no other '/', not '.' or '..', at most {MAX_NAME_CHARS} characters)")
    return SHM_DIR / name


def _map_read_only(name: str, key: str, offset: int, byte_size: int) -> Region:
    path = object_path(key)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RegionError(f"shared-memory object {key!r} does not exist (create it with shm_open "
                          "before registering it)") from None
    except OSError as e:  # ELOOP: a symlink; EACCES: not the server's to read
        raise RegionError(f"shared-memory object {key!r} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RegionError(f"shared-memory object {key!r} is not a shared-memory object")
        if st.st_size < offset + byte_size:
            raise RegionError(f"shared-memory object {key!r} is {st.st_size} bytes; region {name!r} "
                              f"needs offset {offset} + byte_size {byte_size} = {offset + byte_size}")
        readable = mmap.mmap(fd, offset + byte_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    return Region(name, key, offset, byte_size, path, (st.st_dev, st.st_ino), readable, fd)


def _non_negative_int(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise RegionError(f"{what} must be a non-negative integer, got {value!r}")
    return value


class RegionTable:
    """Every owner's regions. Thread-safe: decoding may run off the event loop."""

    def __init__(self, max_regions_per_owner: int = 64) -> None:
        self.max_regions_per_owner = max_regions_per_owner
        self._owners: dict[str, dict[str, Region]] = {}
        self._lock = threading.Lock()

    def register(self, owner: str, name: str, body: object) -> Region:
        """Triton's register body: {"key", "offset", "byte_size"}."""
        if not isinstance(body, dict):
            raise RegionError("the register body must be a JSON object with 'key', 'offset' and 'byte_size'")
        key = body.get("key")
        if not isinstance(key, str):
            raise RegionError(f"'key' must be a string naming the shared-memory object, got {key!r}")
        offset = _non_negative_int(body.get("offset", 0), "'offset'")
        byte_size = _non_negative_int(body.get("byte_size"), "'byte_size'")
        if byte_size == 0:
            raise RegionError("'byte_size' must be at least 1")
        if not name or len(name) > MAX_NAME_CHARS:
            raise RegionError(f"a region name must be 1 to {MAX_NAME_CHARS} characters")
        with self._lock:
            regions = self._owners.get(owner, {})
            if name in regions:
                raise RegionError(f"shared-memory region {name!r} is already registered; unregister it first")
            if len(regions) >= self.max_regions_per_owner:
                raise RegionError(f"{len(regions)} shared-memory regions are registered, the limit; "
                                  "unregister some first")
        region = _map_read_only(name, key, offset, byte_size)  # outside the lock: a syscall or three
        with self._lock:
            regions = self._owners.setdefault(owner, {})
            if name in regions or len(regions) >= self.max_regions_per_owner:  # lost a race with itself
                region.release()
                raise RegionError(f"shared-memory region {name!r} is already registered; unregister it first")
            regions[name] = region
        return region

    def get(self, owner: str, name: object) -> Region:
        """The live region `name`, or a 400; a region whose object is gone is dropped here."""
        if not isinstance(name, str):
            raise RegionError(f"'shared_memory_region' must be a region name, got {name!r}")
        with self._lock:
            region = self._owners.get(owner, {}).get(name)
        if region is None:
            raise RegionError(f"shared-memory region {name!r} is not registered")
        try:
            region.check_alive()
        except RegionError:
            self.unregister(owner, name)
            raise
        return region

    def unregister(self, owner: str, name: str | None = None) -> None:
        """One region, or (None) every region of the owner; unknown names are fine, as in Triton."""
        with self._lock:
            regions = self._owners.get(owner, {})
            gone = list(regions.values()) if name is None else [r for r in (regions.pop(name, None),) if r]
            if name is None:
                regions.clear()
        for region in gone:
            region.release()

    def status(self, owner: str, name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            regions = dict(self._owners.get(owner, {}))
        if name is None:
            return [r.status() for r in regions.values()]
        if name not in regions:
            raise RegionError(f"shared-memory region {name!r} is not registered")
        return [regions[name].status()]

    def close(self) -> None:
        with self._lock:
            owners, self._owners = self._owners, {}
        for regions in owners.values():
            for region in regions.values():
                region.release()
