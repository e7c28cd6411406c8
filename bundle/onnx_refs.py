"""Find the external-data references of an ONNX model without loading it.

Verification must refuse a model whose tensors point at files outside the
bundle (`location: ../../etc/shadow`) *before* any runtime opens it, and must do
so in bounded memory for multi-GiB models. `onnx.load` would materialise every
weight, so this walks the protobuf wire format over an mmap instead: weights
are skipped by length, never touched, and only the small `external_data`
entries are decoded. Subgraphs (If/Loop bodies, attribute tensors, sparse
initializers, functions) are followed, to a bounded depth.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

# Field numbers from onnx.proto (stable since IR v3).
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_FUNC_NODE = 7
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE_INIT = 1, 5, 15
_NODE_ATTR = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_LOCATION_EXTERNAL = 1
_MAX_DEPTH = 64


class ProtobufError(ValueError):
    """The file is not a well-formed protobuf message."""


@dataclass(frozen=True)
class ExternalRef:
    tensor: str
    location: str
    offset: int
    length: int | None


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ProtobufError("truncated or oversized varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field, wire type, value or payload start, payload end)."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        fnum, wtype = tag >> 3, tag & 7
        if wtype == 0:
            value, pos = _varint(buf, pos, end)
            yield fnum, 0, value, pos
        elif wtype == 1:
            pos += 8
            yield fnum, 1, 0, pos
        elif wtype == 5:
            pos += 4
            yield fnum, 5, 0, pos
        elif wtype == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ProtobufError("length-delimited field runs past its message")
            yield fnum, 2, pos, pos + length
            pos += length
        else:
            raise ProtobufError(f"unsupported wire type {wtype}")
        if pos > end:
            raise ProtobufError("field runs past its message")


def _tensor(buf: memoryview, start: int, end: int) -> ExternalRef | None:
    name, external, entries = "", False, {}
    for fnum, wtype, a, b in _fields(buf, start, end):
        if fnum == _TENSOR_NAME and wtype == 2:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif fnum == _TENSOR_LOCATION and wtype == 0:
            external = a == _LOCATION_EXTERNAL
        elif fnum == _TENSOR_EXTERNAL and wtype == 2:
            key = value = ""
            for f2, w2, a2, b2 in _fields(buf, a, b):
                if w2 == 2 and f2 in (1, 2):
                    text = bytes(buf[a2:b2]).decode("utf-8", "replace")
                    key, value = (text, value) if f2 == 1 else (key, text)
            entries[key] = value
    if not external and not entries:
        return None
    try:
        offset = int(entries.get("offset", "0") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise ProtobufError(f"tensor {name!r}: offset/length are not integers") from None
    return ExternalRef(name, entries.get("location", ""), offset, length)


def _walk(buf: memoryview, start: int, end: int, kind: str, depth: int) -> Iterator[ExternalRef]:
    if depth > _MAX_DEPTH:
        raise ProtobufError("subgraphs nested too deeply")
    children: dict[str, dict[int, str]] = {
        "model": {_MODEL_GRAPH: "graph", _MODEL_FUNCTIONS: "function"},
        "function": {_FUNC_NODE: "node"},
        "graph": {_GRAPH_NODE: "node", _GRAPH_INIT: "tensor", _GRAPH_SPARSE_INIT: "sparse"},
        "node": {_NODE_ATTR: "attr"},
        "attr": {_ATTR_T: "tensor", _ATTR_G: "graph", _ATTR_TENSORS: "tensor", _ATTR_GRAPHS: "graph",
                 _ATTR_SPARSE: "sparse", _ATTR_SPARSES: "sparse"},
        "sparse": {_SPARSE_VALUES: "tensor", _SPARSE_INDICES: "tensor"},
    }
    table = children[kind]
    for fnum, wtype, a, b in _fields(buf, start, end):
        child = table.get(fnum)
        if child is None or wtype != 2:
            continue
        if child == "tensor":
            ref = _tensor(buf, a, b)
            if ref is not None:
                yield ref
        else:
            yield from _walk(buf, a, b, child, depth + 1)


def external_refs(path: str | os.PathLike[str]) -> list[ExternalRef]:
    """Every tensor in the model stored outside the .onnx file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ProtobufError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return list(_walk(view, 0, size, "model", 0))
            finally:
                view.release()
