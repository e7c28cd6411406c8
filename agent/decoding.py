"""Where a request body is decoded: on the event loop when small, on worker threads when not.

Decoding one image's JSON takes ~2 ms and a 60 MB body ~200 ms; on the loop that would
stall every other request and the health probes for as long. Small bodies (the common
MLP request: a few microseconds) stay inline, where a thread hand-off would cost more
than the work. Bigger ones go to a small pool; `agent.json_tensors` parses big arrays in
pieces so that the pool's threads never hold the GIL, which the loop needs, for more than
a few milliseconds at a time. How many bodies decode at once is bounded by the HTTP
edge's byte budget (`agent.admission`); they decode one at a time.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from . import protocol

#: JSON up to this size is decoded on the loop (a thread hand-off costs ~50-100 us)
INLINE_BYTES = 64 << 10
#: one: on a 2-core device a second decoding thread mostly competes with the loop for the GIL
DECODE_THREADS = 1

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="outpost-decode")
        return _pool


def _json_bytes(body: bytes | bytearray, header_length: str | int | None) -> int:
    if header_length is None or header_length == "":
        return len(body)
    try:
        return int(header_length)
    except (TypeError, ValueError):
        return 0  # decode_request refuses it at once


async def decode_request(body: bytes | bytearray, header_length: str | int | None = None,
                         regions: protocol.RegionReader | None = None) -> protocol.InferRequest:
    """`protocol.decode_request`, inline or on a worker thread by the size of the JSON to parse."""
    if _json_bytes(body, header_length) <= INLINE_BYTES:
        return protocol.decode_request(body, header_length, regions)
    return await asyncio.get_running_loop().run_in_executor(
        _executor(), protocol.decode_request, body, header_length, regions)
