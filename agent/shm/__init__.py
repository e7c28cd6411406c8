"""Triton's system shared-memory extension: tensors passed by reference between local processes.

A camera or audio pipeline on the same device puts its tensor in a POSIX
shared-memory object (`/dev/shm/<key>`), registers a window of it once as a
named region, and from then on sends only `{shared_memory_region,
shared_memory_offset, shared_memory_byte_size}` in place of `data`; the
server reads the tensor straight from the mapping (`np.frombuffer`, no copy)
and can write outputs into a region the same way (`np.copyto`). Same routes
and bodies as Triton (`/v2/systemsharedmemory/...`), so `tritonclient`'s
`utils.shared_memory` and `InferInput.set_shared_memory` work unchanged.

Who may read and write where (the extension is off unless `outpost serve
--shared-memory`, and every route needs the bearer token when one is set):

- A client can name any object in /dev/shm that the server's user can open.
  Keys are one path component (no `/`, `.` or `..`), opened with O_NOFOLLOW
  and refused unless they are regular files, so a symlink planted in the
  world-writable /dev/shm cannot point the server at a file elsewhere.
- Regions are mapped read-only (O_RDONLY, PROT_READ) at registration: as an
  input, nothing the server does can change the client's memory.
- The server writes only into a region a request names for an *output*, only
  inside that output's `[offset, offset + byte_size)` slot, only after the
  model has answered, and only through a second, writable mapping opened the
  first time the region is used for an output (O_RDWR; an object the server's
  user may only read is refused there with a 400, and stays usable for inputs).
  Two outputs of one request whose slots overlap (also through two regions on
  the same object) are refused before any compute.
- Regions belong to the client's token (to the server when there is none):
  one client cannot see, use or unregister another's.
- An unlinked (or replaced) object: requests already decoded keep reading
  their mapping, which stays valid; the next request that names the region
  gets a 400 and the region is dropped. A client that *shrinks* an object
  under a mapping makes the kernel fault the reader (SIGBUS); the size is
  checked on every request, which narrows this to a race only the owner of the
  object can start, and is why the extension is opt-in.
"""

from .registry import Region, RegionError, RegionTable
from .tensors import ClientRegions, OutputPlacement

__all__ = ["ClientRegions", "OutputPlacement", "Region", "RegionError", "RegionTable"]
