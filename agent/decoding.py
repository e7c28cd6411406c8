"""Where a request body is decoded: on the event loop when small, on worker threads when big.

Decoding one image's JSON takes ~2 ms and a 60 MB body ~100 ms, all of it holding the GIL
in C; on the loop that would stall every other request and the health probes for as long.
Small bodies (the common MLP request: a few microseconds) stay inline, where a thread
hand-off would cost more than the work. Big JSON bodies go to one dedicated thread that
keeps its simdjson parser between requests (a fresh parser faults in ~4x the body in new
pages: 140 ms instead of 70 ms for 60 MB), and gives those buffers back after
`BIG_PARSER_IDLE_S` without a big body. Everything in between shares a small pool whose
threads keep only small parsers. The number of bodies decoding at once is bounded by
the HTTP edge's byte budget (`agent.admission`), not here.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from . import json_tensors, protocol

#: JSON up to this size is decoded on the loop (a thread hand-off costs ~50-100 us)
INLINE_BYTES = 64 << 10
#: a big-body parser's buffers are released after this long without a big body
BIG_PARSER_IDLE_S = 30.0


class _Lanes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._small: ThreadPoolExecutor | None = None
        self._big: ThreadPoolExecutor | None = None
        self._idle: threading.Timer | None = None

    def small(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._small is None:
                self._small = ThreadPoolExecutor(2, thread_name_prefix="outpost-decode")
            return self._small

    def big(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._big is None:
                self._big = ThreadPoolExecutor(1, thread_name_prefix="outpost-decode-big",
                                               initializer=json_tensors.keep_big_parser)
            return self._big

    def decode_big(self, body: bytes | bytearray, header_length: str | int | None) -> protocol.InferRequest:
        """On the big lane's thread; restarts the idle timer that releases its parser."""
        try:
            return protocol.decode_request(body, header_length)
        finally:
            with self._lock:
                if self._idle is not None:
                    self._idle.cancel()
                self._idle = threading.Timer(BIG_PARSER_IDLE_S, self._release_big)
                self._idle.daemon = True
                self._idle.start()

    def _release_big(self) -> None:
        with self._lock:
            big = self._big
        if big is not None:  # the parser is thread-local: released on the lane's own thread
            big.submit(json_tensors.release_parser)


_lanes = _Lanes()


def _json_bytes(body: bytes | bytearray, header_length: str | int | None) -> int:
    if header_length is None or header_length == "":
        return len(body)
    try:
        return int(header_length)
    except (TypeError, ValueError):
        return 0  # decode_request refuses it at once


async def decode_request(body: bytes | bytearray, header_length: str | int | None = None) -> protocol.InferRequest:
    """`protocol.decode_request`, inline or on a worker thread by the size of the JSON to parse."""
    size = _json_bytes(body, header_length)
    if size <= INLINE_BYTES:
        return protocol.decode_request(body, header_length)
    loop = asyncio.get_running_loop()
    if size > json_tensors.KEEP_PARSER_BYTES:
        return await loop.run_in_executor(_lanes.big(), _lanes.decode_big, body, header_length)
    return await loop.run_in_executor(_lanes.small(), protocol.decode_request, body, header_length)
