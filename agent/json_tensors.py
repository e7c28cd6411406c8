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

Big bodies are parsed in pieces. simdjson holds the GIL for the whole of a parse (~1.2 ms
per MB here), so a 60 MB body in one piece would stall the event loop, health probes
included, for 70-140 ms. Above `SPLIT_BYTES`, each flat numeric `data` array of the
document is cut out of the text: the rest (the skeleton, with a per-request nonce string
in each array's place) is parsed as usual, and the array's text is cut at commas into
pieces of ~`PIECE_BYTES`, each parsed on its own, so no single GIL hold exceeds a few
milliseconds. Every byte still goes through simdjson: a cut that was not an input's
`data` (its nonce turns up anywhere else) or a piece that does not parse falls back to
parsing the document whole, whose verdict then stands.

Parsers are per thread (a parser is not thread-safe) and kept while the documents they
parse are small; a parser's buffers grow to ~4x the largest document it has seen, so a
thread drops its parser after a big one.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import simdjson

from .errors import InvalidRequest

#: a thread keeps its parser after documents up to this size (its buffers: ~4x this)
KEEP_PARSER_BYTES = 4 << 20
#: documents above this have their big flat `data` arrays parsed in pieces ...
SPLIT_BYTES = 4 << 20
#: ... of about this many bytes (~1 ms of parsing each)
PIECE_BYTES = 1 << 20

_local = threading.local()

#: as_buffer's element codes for the numpy kinds that take the fast path
_BUFFER_CODES: dict[str, tuple[Literal["d", "i", "u"], np.dtype[Any]]] = {
    "f": ("d", np.dtype(np.float64)), "i": ("i", np.dtype(np.int64)), "u": ("u", np.dtype(np.uint64))}


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


_Object, _Array = simdjson.Object, simdjson.Array


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind is _Object:
        return value.as_dict()
    if kind is _Array:
        return value.as_list()
    return value


def _fields(obj: simdjson.Object, lazy: str) -> dict[str, Any]:
    # keys() then [] instead of items(): items() would turn a big `data` into Python objects
    try:
        return {k: (obj[k] if k == lazy else _plain(obj[k])) for k in obj.keys()}  # noqa: SIM118
    except KeyError:  # a key with a NUL in it cannot be looked up by name: convert it all
        return obj.as_dict()


def parse_request_document(data: bytes | bytearray | memoryview) -> Any:
    """The request as Python values, each input's `data` left lazy (a `simdjson.Array`, or the
    `NumberText` of a big array parsed in pieces) for `numbers_to_numpy`.

    Anything but an object is returned as plain Python for the caller to refuse.
    """
    if len(data) > SPLIT_BYTES and isinstance(data, (bytes, bytearray)):
        doc = _parse_split(data)
        if doc is not None:
            return doc
    return _parse_whole(data)


def _parse_whole(data: bytes | bytearray | memoryview) -> Any:
    try:
        doc = _parse(data)
        if type(doc) is not _Object:
            return _plain(doc)
        out = _fields(doc, "inputs")
        inputs = out.get("inputs")
        if type(inputs) is _Array:
            out["inputs"] = [_fields(i, "data") if type(i) is _Object else _plain(i) for i in inputs]
        return out
    finally:
        doc = inputs = None  # proxies gone before the parser is reused or dropped
        if len(data) > KEEP_PARSER_BYTES:
            release_parser()


class NumberText:
    """The text of a flat JSON array, `[` at `start` and `]` at `end`, parsed in pieces on demand."""

    def __init__(self, data: bytes | bytearray, start: int, end: int) -> None:
        self.data, self.start, self.end = data, start, end

    def pieces(self) -> Iterator[bytes]:
        """`[a,b,...]` texts of ~PIECE_BYTES, cut at commas, that together hold every element
        (made one at a time: never a second copy of the whole array)."""
        pos, end, data = self.start + 1, self.end, self.data
        if pos >= end:
            yield b"[]"
        while pos < end:
            cut = data.find(b",", min(pos + PIECE_BYTES, end), end)
            stop = end if cut < 0 else cut
            yield b"[" + data[pos:stop] + b"]"
            pos = stop + 1

    def whole(self) -> bytes:
        return bytes(self.data[self.start:self.end + 1])


def _flat_array_spans(data: bytes | bytearray) -> list[tuple[int, int]]:
    """(start, end) of each `"data": [ ... ]` whose text holds no string, object or nested array
    and is long enough to be worth cutting. Only candidates: the skeleton parse decides."""
    spans, pos = [], 0
    while (key := data.find(b'"data"', pos)) >= 0:
        pos = key + 6
        colon = _skip_space(data, pos)
        if colon >= len(data) or data[colon] != 0x3A:  # ':'
            continue
        start = _skip_space(data, colon + 1)
        if start >= len(data) or data[start] != 0x5B:  # '['
            continue
        end = data.find(b"]", start)
        if end < 0 or end - start < 2 * PIECE_BYTES:
            continue
        if any(data.find(c, start + 1, end) >= 0 for c in (b"[", b'"', b"{")):
            continue
        spans.append((start, end))
        pos = end + 1
    return spans


def _skip_space(data: bytes | bytearray, pos: int) -> int:
    while pos < len(data) and data[pos] in b" \t\r\n":
        pos += 1
    return pos


def _parse_split(data: bytes | bytearray) -> Any:
    """The document with its big flat arrays left as `NumberText`; None to parse it whole."""
    spans = _flat_array_spans(data)
    if not spans:
        return None
    nonce = secrets.token_hex(16)
    parts: list[bytes | bytearray] = []
    pos = 0
    for i, (start, end) in enumerate(spans):
        parts += (data[pos:start], b'"%s:%d"' % (nonce.encode(), i))
        pos = end + 1
    parts.append(data[pos:])
    try:
        doc = _parse_whole(b"".join(parts))
    except InvalidRequest:
        return None
    found = 0
    for inp in doc.get("inputs", ()) if isinstance(doc, dict) and isinstance(doc.get("inputs"), list) else ():
        value = inp.get("data") if isinstance(inp, dict) else None
        if isinstance(value, str) and value.startswith(nonce + ":"):
            inp["data"] = NumberText(data, *spans[int(value[len(nonce) + 1:])])
            found += 1
    return doc if found == len(spans) else None  # a cut elsewhere (say, in parameters): parse whole


def leading_dims(array: simdjson.Array | NumberText) -> list[int] | None:
    """Lengths along the first element of each nesting level: [rows, cols] for [[1,2],[3,4]];
    their product is the element count of a regular array. None: flat by construction."""
    if isinstance(array, NumberText):
        return None
    dims = [len(array)]
    node: Any = array
    while dims[-1] and isinstance(node := node[0], simdjson.Array):
        dims.append(len(node))
    return dims


def numbers_to_numpy(array: simdjson.Array | NumberText, kind: str) -> list[np.ndarray] | None:
    """All numbers of `array` (nested arrays flattened in row-major order) as float64, int64 or
    uint64 chunks (one per piece; one for a `simdjson.Array`); None when some element is not
    a number of that kind (a string, a bool, null, an object, a float for an integer kind, a
    negative for uint), so the caller's strict path can name the element.
    """
    code, dtype = _BUFFER_CODES[kind]
    if isinstance(array, NumberText):
        chunks = []
        for piece in array.pieces():  # the GIL is free for the event loop between pieces
            try:
                doc = _parse(piece)
                chunks.append(np.frombuffer(doc.as_buffer(of_type=code), dtype=dtype))
            except (InvalidRequest, TypeError, ValueError, AttributeError):
                return None
            finally:
                doc = None
        return chunks
    try:
        return [np.frombuffer(array.as_buffer(of_type=code), dtype=dtype)]
    except (TypeError, ValueError):
        return None


def materialize(value: Any) -> Any:
    """A lazy `data` as Python objects (the strict, slow path)."""
    if isinstance(value, NumberText):
        doc = _parse(value.whole())
        try:
            return _plain(doc)
        finally:
            doc = None
    return _plain(value)


def is_array(value: object) -> bool:
    return isinstance(value, (simdjson.Array, NumberText))
