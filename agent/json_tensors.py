"""JSON request documents with tensor `data` decoded straight into numpy.

Why not orjson + `np.asarray`: that creates one Python float per number (150,528
for one 224x224 image) and then copies them into numpy, ~5 ms per image on this
machine and all of it under the GIL. simdjson (pysimdjson) parses the document
into its own tape and `Array.as_buffer` copies a homogeneous array's numbers into
a C buffer that numpy wraps: no Python object per number (bench/json_decode_bench.py
measures both side by side).

`parse_request_document` turns the document into plain Python values except each
input's `data`, which stays a `simdjson.Array` until `numbers_to_numpy` converts it
(`agent.protocol.decode_request` drops them before it returns; a parser can only be
reused once every proxy into its last document is gone, else a fresh one is made).

Parsers are per thread (a parser is not thread-safe) and kept while the documents they
parse are small; a parser's buffers grow to ~4x the largest document it has seen, so a
thread drops its parser after a big document unless it is the one thread that
`agent.decode_pool` keeps for big bodies (`keep_big_parser`), where reuse halves the
parse time (no fresh pages to fault in) and the buffers are released when idle.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import numpy as np
import simdjson

from .errors import InvalidRequest

#: a thread keeps its parser after documents up to this size (its buffers: ~4x this)
KEEP_PARSER_BYTES = 4 << 20

_local = threading.local()

#: as_buffer's element codes for the numpy kinds that take the fast path
_BUFFER_CODES: dict[str, tuple[Literal["d", "i", "u"], np.dtype[Any]]] = {
    "f": ("d", np.dtype(np.float64)), "i": ("i", np.dtype(np.int64)), "u": ("u", np.dtype(np.uint64))}


def keep_big_parser(keep: bool = True) -> None:
    """Let this thread keep its parser after big documents (the big-body decode thread)."""
    _local.keep_big = keep


def release_parser() -> None:
    """Drop this thread's parser and its buffers."""
    _local.parser = None


def _parser() -> simdjson.Parser:
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    return parser


def _parse(data: bytes | bytearray | memoryview) -> Any:
    parser = _parser()
    try:
        try:
            return parser.parse(data)
        except RuntimeError as e:
            if "re-use" not in str(e):
                raise
            # a proxy from this thread's last document is still referenced (an exception's
            # traceback, say): a fresh parser rather than waiting for it to go
            _local.parser = simdjson.Parser()
            return _local.parser.parse(data)
    except (ValueError, RuntimeError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidRequest(f"malformed JSON: {e}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _fields(obj: simdjson.Object, lazy: str | None = None) -> dict[str, Any]:
    # keys() then [] instead of items(): items() would turn a big `data` into Python objects
    return {k: (obj[k] if k == lazy else _plain(obj[k])) for k in obj.keys()}  # noqa: SIM118


def parse_request_document(data: bytes | bytearray | memoryview) -> Any:
    """The request as Python values, each input's `data` left as a `simdjson.Array` for numpy.

    Anything but an object is returned as plain Python for the caller to refuse.
    """
    try:
        doc = _parse(data)
        if not isinstance(doc, simdjson.Object):
            return _plain(doc)
        out = _fields(doc, lazy="inputs")
        inputs = out.get("inputs")
        if isinstance(inputs, simdjson.Array):
            out["inputs"] = [_fields(i, lazy="data") if isinstance(i, simdjson.Object) else _plain(i)
                             for i in inputs]
        return out
    finally:
        doc = inputs = None  # proxies gone before the parser is reused or dropped
        if len(data) > KEEP_PARSER_BYTES and not getattr(_local, "keep_big", False):
            release_parser()


def leading_dims(array: simdjson.Array) -> list[int]:
    """Lengths along the first element of each nesting level: [rows, cols] for [[1,2],[3,4]]."""
    dims = [len(array)]
    node: Any = array
    while dims[-1] and isinstance(node := node[0], simdjson.Array):
        dims.append(len(node))
    return dims


def numbers_to_numpy(array: simdjson.Array, kind: str) -> np.ndarray | None:
    """All numbers of `array` (nested arrays flattened in row-major order) as float64, int64 or
    uint64; None when some element is not a number of that kind (a string, a bool, null, an
    object, a float for an integer kind, a negative for uint), so the caller's strict path
    can name the element.
    """
    code, dtype = _BUFFER_CODES[kind]
    try:
        return np.frombuffer(array.as_buffer(of_type=code), dtype=dtype)
    except (TypeError, ValueError):
        return None


def materialize(value: Any) -> Any:
    """A lazy `data` as Python objects (the strict, slow path)."""
    return _plain(value)


def is_array(value: object) -> bool:
    return isinstance(value, simdjson.Array)
