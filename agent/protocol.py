"""The Open Inference Protocol (KServe v2) as a pure codec: bytes in, typed objects out.

No transport, no model: HTTP and MQTT both hand this module the request body
(JSON header plus the optional binary tail of the binary tensor data
extension) and get back an `InferRequest`; they hand it an `InferResponse`
and get back the bytes to send. Keeping it pure makes every protocol corner a
unit test and lets both transports answer byte-for-byte the same.

Speed matters here more than anywhere else in the agent (see FIELD-NOTES):
binary tensors are wrapped with `np.frombuffer` (no copy, no parse); JSON requests
are parsed with simdjson and each tensor's numbers copied straight into numpy
(`agent.json_tensors`: no Python object per number); responses are written with
orjson straight from numpy, non-finite floats included.

Non-finite outputs: JSON has no NaN or Infinity, so a float output holding them
is written with the strings "NaN", "Infinity" and "-Infinity" in place of those
elements (the spellings JavaScript and Python's `float()` read back), and the
whole body stays valid JSON. Inputs may use the same strings.

Strict JSON types: FP inputs take JSON numbers and those three strings only (never
numeric strings, booleans or null); integer inputs take JSON integers within the
datatype's range; BOOL takes true/false; BYTES takes strings. `data` is flat or
nested as the shape, with exactly as many elements as the shape needs.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from . import json_tensors
from .errors import InvalidRequest, ValidationError

#: v2 datatype name -> numpy dtype (BYTES is a numpy object array of str).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
#: manifest dtype (bundle TensorSpec.dtype) -> v2 datatype name.
SPEC_DATATYPES: dict[str, str] = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64", "bfloat16": "BF16", "string": "BYTES",
}
MAX_RANK = 16
_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf,
                 "nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_NONFINITE_OUT = (b'"-Infinity"', b'"NaN"', b'"Infinity"')  # by sign(x) + 1, NaN read as 0
_LEN = struct.Struct("<I")
#: [shm] an input passed by reference (agent.shm, Triton's system shared memory): (name, parameters) -> its bytes
SHM_REGION = "shared_memory_region"
RegionReader = Callable[[str, Mapping[str, Any]], memoryview]


_NAME_BY_DTYPE = {dt: name for name, dt in DATATYPES.items() if name != "BYTES"}
_NAME_BY_DTYPE.update({dt.newbyteorder(">"): name for dt, name in list(_NAME_BY_DTYPE.items())})


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name of a numpy array (str/bytes/object arrays are BYTES)."""
    name = _NAME_BY_DTYPE.get(array.dtype)
    if name is not None:
        return name
    if array.dtype.kind in "OUS":
        return "BYTES"
    raise InvalidRequest(f"dtype {array.dtype} has no Open Inference Protocol datatype")


@dataclass(frozen=True)
class InferInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    #: None: follow the request's `binary_data_output` parameter.
    binary: bool | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    inputs: tuple[InferInput, ...]
    #: None: every output of the model.
    outputs: tuple[RequestedOutput, ...] | None = None
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def binary_output_default(self) -> bool:
        return bool(self.parameters.get("binary_data_output", False))

    def input(self, name: str) -> InferInput:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(name)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    data: np.ndarray
    binary: bool = False
    #: [shm] written into a client's shared-memory region: the response only points there
    shared_memory: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: tuple[OutputTensor, ...]
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedResponse:
    """`header` is the JSON; `tail` the binary outputs in order; send them back to back."""

    header: bytes
    tail: tuple[bytes, ...] = ()
    #: Value of Inference-Header-Content-Length; None when there is no binary tail.
    header_length: int | None = None

    @property
    def content_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"

    def body(self) -> bytes:
        return self.header if not self.tail else b"".join((self.header, *self.tail))


# --------------------------------------------------------------------------------------- decoding


def split_body(body: bytes | bytearray, header_length: str | int | None
               ) -> tuple[bytes | bytearray | memoryview, memoryview]:
    """Separate the JSON header from the binary tail (Inference-Header-Content-Length)."""
    view = memoryview(body)
    if header_length is None or header_length == "":
        return body, view[len(body):]
    try:
        n = int(header_length)
    except (TypeError, ValueError):
        raise InvalidRequest(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise InvalidRequest(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
    return view[:n], view[n:]


def parse_json(data: bytes | memoryview | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"malformed JSON: {e}") from None


def decode_request(body: bytes | bytearray, header_length: str | int | None = None,
                   regions: RegionReader | None = None) -> InferRequest:
    """Decode a v2 inference request body (JSON, or JSON + binary tail; `regions`: inputs by reference)."""
    if header_length is None or header_length == "":
        header: bytes | bytearray | memoryview = body
        tail = _NO_TAIL
    else:
        header, tail = split_body(body, header_length)
    doc = json_tensors.parse_request_document(header)
    if type(doc) is not dict:
        raise InvalidRequest("the request must be a JSON object")
    raw_inputs = doc.get("inputs")
    if type(raw_inputs) is not list:
        raise InvalidRequest("'inputs' must be a list")
    offset = 0
    inputs: list[InferInput] = []
    for raw in raw_inputs:
        inp, offset = _decode_input(raw, tail, offset, regions)
        inputs.append(inp)
    if offset != len(tail):
        raise InvalidRequest(f"{len(tail) - offset} bytes of binary data are not claimed by any input")
    if len(inputs) > 1 and len({i.name for i in inputs}) != len(inputs):
        raise InvalidRequest("each input may appear once")
    raw_params = doc.get("parameters")
    params = _NO_PARAMS if raw_params is None else _params(raw_params, "request")
    req_id = doc.get("id")
    if req_id is not None and type(req_id) is not str:
        raise InvalidRequest("'id' must be a string")
    raw_outputs = doc.get("outputs")
    outputs = None if raw_outputs is None else _decode_outputs(raw_outputs)
    if regions is None and outputs and any(SHM_REGION in o.parameters for o in outputs):  # [shm]
        raise InvalidRequest(_NO_SHM)
    return InferRequest(tuple(inputs), outputs, req_id, params)


#: the binary tail of a body without one; the parameters of a request, input or output without any
#: (shared, never written: decoded objects only ever read their parameters)
_NO_TAIL = memoryview(b"")
_NO_PARAMS: dict[str, Any] = {}


def _params(raw: object, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequest(f"'parameters' of the {where} must be an object")
    return raw


def _decode_outputs(raw: object) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidRequest("'outputs' must be a list")
    outs = []
    for o in raw:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidRequest("each requested output must be an object with a string 'name'")
        params = _params(o.get("parameters"), f"output {o['name']!r}")
        binary = params.get("binary_data")
        outs.append(RequestedOutput(o["name"], None if binary is None else bool(binary), params))
    return tuple(outs)


_NO_SHM = "shared-memory tensors are served over HTTP by `outpost serve --shared-memory` only"


def _decode_input(raw: object, tail: memoryview, offset: int,
                  regions: RegionReader | None = None) -> tuple[InferInput, int]:
    if type(raw) is not dict or type(name := raw.get("name")) is not str:
        raise InvalidRequest("each input must be an object with a string 'name'")
    datatype = raw.get("datatype")
    dtype = DATATYPES.get(datatype) if type(datatype) is str else None
    if dtype is None:
        raise ValidationError(name, f"unknown datatype {datatype!r}; expected one of {sorted(DATATYPES)}")
    shape_raw = raw.get("shape")
    if type(shape_raw) is not list or len(shape_raw) > MAX_RANK or not _dims(shape_raw):
        raise ValidationError(name, f"'shape' must be a list of at most {MAX_RANK} non-negative integers, "
                                    f"got {str(shape_raw)[:80]}")
    shape = tuple(shape_raw)
    count = math.prod(shape)
    raw_params = raw.get("parameters")
    params = _NO_PARAMS if raw_params is None else _params(raw_params, f"input {name!r}")
    if count == 0:
        _check_empty_shape(name, shape, dtype)
    if params:
        if SHM_REGION in params:  # [shm] by reference: a read-only view of the client's region, no copy
            if regions is None:
                raise ValidationError(name, _NO_SHM)
            array = _from_binary(name, regions(name, params), dtype, shape, count)
            return InferInput(name, datatype, shape, array, params), offset  # type: ignore[arg-type]
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise ValidationError(name, "'binary_data_size' must be a non-negative integer")
            if offset + size > len(tail):
                raise ValidationError(name, f"binary_data_size {size} runs past the end of the body")
            chunk = tail[offset:offset + size]
            array = _from_binary(name, chunk, dtype, shape, count)
            return InferInput(name, datatype, shape, array, params), offset + size  # type: ignore[arg-type]
    if "data" not in raw:
        raise ValidationError(name, "has neither 'data' nor a 'binary_data_size' parameter")
    array = _from_json(name, raw["data"], dtype, shape, count)
    return InferInput(name, datatype, shape, array, params), offset  # type: ignore[arg-type]


def _dims(shape: list[Any]) -> bool:
    for d in shape:  # noqa: SIM110 (a loop: all() over a generator costs more than the check)
        if type(d) is not int or d < 0:
            return False
    return True


def _check_empty_shape(name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    """numpy refuses a 0-sized shape whose other dims overflow its index type ([0, 2**62, 2**62])."""
    try:
        np.empty(shape, dtype=dtype)
    except ValueError:
        raise ValidationError(name, f"shape {list(shape)} is too big for any tensor, even an empty one") from None


def _from_binary(name: str, chunk: memoryview, dtype: np.dtype[Any], shape: tuple[int, ...],
                 count: int) -> np.ndarray:
    if dtype.kind == "O":
        return _bytes_from_binary(name, chunk, shape, count)
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise ValidationError(name, f"binary data is {len(chunk)} bytes; shape {list(shape)} of "
                                    f"{_v2(dtype)} needs {expected}")
    array = np.frombuffer(chunk, dtype=dtype)
    if not array.flags.aligned:  # an odd header length shifts the tail; ORT wants aligned memory
        array = array.copy()
    return array.reshape(shape)


def _bytes_from_binary(name: str, chunk: memoryview, shape: tuple[int, ...], count: int) -> np.ndarray:
    items: list[str] = []
    pos, raw = 0, bytes(chunk)
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ValidationError(name, "truncated BYTES element length")
        (n,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ValidationError(name, "BYTES element runs past its binary data")
        try:
            items.append(raw[pos:pos + n].decode())
        except UnicodeDecodeError:
            raise ValidationError(name, "BYTES element is not UTF-8") from None
        pos += n
    if len(items) != count:
        raise ValidationError(name, f"has {len(items)} BYTES elements; shape {list(shape)} needs {count}")
    return np.array(items, dtype=object).reshape(shape)


def _from_json(name: str, data: object, dtype: np.dtype[Any], shape: tuple[int, ...],
               count: int) -> np.ndarray:
    if dtype.kind in "fiu" and json_tensors.is_array(data):
        fast = _numbers_from_json(name, data, dtype, shape, count)
        if fast is not None:
            return fast
    data = json_tensors.materialize(data)
    if not isinstance(data, list):
        raise ValidationError(name, "'data' must be a list")
    return _strict_from_json(name, data, dtype, shape, count)


def _numbers_from_json(name: str, data: Any, dtype: np.dtype[Any], shape: tuple[int, ...],
                       count: int) -> np.ndarray | None:
    """The fast path: every element a JSON number of the right kind, copied into numpy in C.

    None when some element is anything else (NaN tokens, booleans, strings, a float for
    an integer type...): the strict path then converts or names it.
    """
    chunks = json_tensors.numbers_to_numpy(data, dtype.kind)
    if chunks is None:
        return None
    size = chunks[0].size if len(chunks) == 1 else sum(c.size for c in chunks)
    dims = json_tensors.leading_dims(data)
    if dims is not None and (dims[0] if len(dims) == 1 else math.prod(dims)) != size:
        raise ValidationError(name, f"'data' is not a regular array: its first rows have lengths {dims} "
                                    f"but it holds {size} numbers")
    if size != count:
        raise ValidationError(name, f"has {size} elements; shape {list(shape)} needs {count}")
    if dtype.kind in "iu" and chunks[0].dtype != dtype:  # int64/uint64 hold every value they were parsed as
        for c in chunks:
            if c.size:
                _check_range(name, c, dtype)
    if len(chunks) == 1:
        first = chunks[0]
        return (first if first.dtype == dtype else _cast(first, dtype)).reshape(shape)
    out = np.empty(count, dtype=dtype)
    pos = 0
    with np.errstate(over="ignore"):
        for c in chunks:  # piece by piece: no long GIL hold for the event loop to wait on
            out[pos:pos + c.size] = c
            pos += c.size
    return out.reshape(shape)


#: past FP16/FP32's range is Inf, refused later unless allowed (the decorator form of errstate
#: costs half of a `with` block: this runs once per JSON input)
_cast: Callable[[np.ndarray, np.dtype[Any]], np.ndarray] = np.errstate(over="ignore")(
    lambda a, dtype: a.astype(dtype))


def _check_range(name: str, array: np.ndarray, dtype: np.dtype[Any]) -> None:
    info = np.iinfo(dtype)
    if array.min() < info.min or array.max() > info.max:
        raise ValidationError(name, f"value out of range for {_v2(dtype)}")


def _strict_from_json(name: str, data: list[Any], dtype: np.dtype[Any], shape: tuple[int, ...],
                      count: int) -> np.ndarray:
    """Python values, checked element by element: the path of BOOL, BYTES, tokens and mistakes."""
    try:
        array = np.array(data, dtype=object if dtype.kind == "O" else None)
    except (ValueError, TypeError) as e:
        raise ValidationError(name, f"'data' is not a regular array: {e}") from None
    if array.size != count:
        raise ValidationError(name, f"has {array.size} elements; shape {list(shape)} needs {count}")
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    kind, want = array.dtype.kind, dtype.kind
    if want == "O":
        flat = array.ravel()
        if not all(isinstance(x, str) for x in flat):
            raise ValidationError(name, "BYTES data must be strings")
        return flat.reshape(shape)
    if want == "b":
        if kind != "b":
            raise ValidationError(name, f"expected true/false for BOOL, got {_kind_name(kind)}")
        return array.reshape(shape)
    if kind == "b":
        raise ValidationError(name, f"expected numbers for {_v2(dtype)}, got booleans")
    if want == "f":
        # numpy reads [1.5, true] as floats: every element is checked to be a number or a token
        with np.errstate(over="ignore"):
            return _floats_with_tokens(name, np.array(data, dtype=object)).astype(dtype).reshape(shape)
    values = np.array(data, dtype=object).ravel().tolist()
    bad = next((i for i, x in enumerate(values) if type(x) is not int), None)  # bool is not int here, nor 1.0
    if bad is not None:
        raise ValidationError(name, f"expected integers for {_v2(dtype)}, got {_kind_name(kind)} "
                                    f"(element {bad} is {str(values[bad])[:20]!r})")
    info = np.iinfo(dtype)
    if min(values) < info.min or max(values) > info.max:
        raise ValidationError(name, f"value out of range for {_v2(dtype)}")
    return np.array(values, dtype=dtype).reshape(shape)


def _floats_with_tokens(name: str, array: np.ndarray) -> np.ndarray:
    flat = array.ravel().tolist()
    out = np.empty(len(flat), dtype=np.float64)
    for i, x in enumerate(flat):
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            out[i] = x
        elif isinstance(x, str) and x in _NONFINITE_IN:
            out[i] = _NONFINITE_IN[x]
        else:
            raise ValidationError(name, f"element {i} is {str(x)[:20]!r}, not a number")
    return out.reshape(array.shape)


def _kind_name(kind: str) -> str:
    return {"f": "floats", "i": "integers", "u": "integers", "b": "booleans", "U": "strings",
            "O": "mixed values", "S": "bytes"}.get(kind, kind)


def _v2(dtype: np.dtype[Any]) -> str:
    return next(k for k, v in DATATYPES.items() if v == dtype)


# --------------------------------------------------------------------------------------- encoding


def build_response(request: InferRequest, model_name: str, model_version: str,
                   results: Mapping[str, np.ndarray]) -> InferResponse:
    """Pick and order the outputs the request asked for, each binary or JSON as it asked."""
    params = request.parameters
    default = bool(params.get("binary_data_output", False)) if params else False
    if request.outputs is None:
        outs = tuple([OutputTensor(n, a, default) for n, a in results.items()])
    else:
        outs = tuple([OutputTensor(o.name, results[o.name], default if o.binary is None else o.binary)
                      for o in request.outputs])
    return InferResponse(model_name, model_version, outs, request.id)


def encode_response(response: InferResponse) -> EncodedResponse:
    outputs: list[dict[str, Any]] = []
    tail: list[bytes] = []
    for out in response.outputs:
        arr = out.data
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype_of(arr), "shape": list(arr.shape)}
        if out.shared_memory is not None:  # [shm]
            entry["parameters"] = dict(out.shared_memory)
        elif out.binary:
            raw = _to_binary(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = _to_json_data(arr)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version,
                           "outputs": outputs}
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = dict(response.parameters)
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return EncodedResponse(header, tuple(tail), len(header) if tail else None)


def _to_binary(arr: np.ndarray) -> bytes:
    if arr.dtype.kind in "OUS":
        parts = []
        for x in arr.ravel().tolist():
            b = x if isinstance(x, bytes) else str(x).encode()
            parts += [_LEN.pack(len(b)), b]
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _to_json_data(arr: np.ndarray) -> Any:
    kind = arr.dtype.kind
    if kind in "OUS":
        return [x.decode(errors="backslashreplace") if isinstance(x, bytes) else str(x) for x in arr.ravel().tolist()]
    flat = arr.reshape(-1) if arr.flags.c_contiguous else np.ascontiguousarray(arr).ravel()
    if kind == "f":
        if flat.dtype.itemsize == 2:
            flat = flat.astype(np.float32)  # exact; orjson writes float16 with fewer guarantees
        if not all_finite(flat):
            return _with_nonfinite_tokens(flat)
    return flat


def _with_nonfinite_tokens(flat: np.ndarray) -> orjson.Fragment:
    """orjson writes the numbers from numpy (non-finite ones as null); each null becomes its token."""
    raw = orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY)
    bad = flat[~np.isfinite(flat)]
    which = np.sign(np.nan_to_num(bad, nan=0.0, posinf=1.0, neginf=-1.0)).astype(np.intp) + 1
    if (which == which[0]).all():  # one kind of non-finite value (all NaN, say): one C-level replace
        return orjson.Fragment(raw.replace(b"null", _NONFINITE_OUT[which[0]]))
    parts = raw.split(b"null")
    tokens = [_NONFINITE_OUT[w] for w in which.tolist()]
    return orjson.Fragment(b"".join(itertools.chain.from_iterable(zip(parts, [*tokens, b""], strict=True))))


def count_non_finite(arrays: Iterable[np.ndarray]) -> int:
    """Non-finite elements across float outputs (the fleet gates on the NaN rate)."""
    bad = 0
    for a in arrays:
        if a.dtype.kind == "f" and not all_finite(a):
            bad += int(a.size - np.count_nonzero(np.isfinite(a)))
    return bad


def all_finite(a: np.ndarray) -> bool:
    """Whether a float array holds no NaN or Inf (a dot product with zeros would be cheaper on small
    arrays, but Inf * 0 raises numpy's invalid-value warning, and silencing it costs what it saves)."""
    return bool(np.isfinite(a).all())


def encode_error(message: str) -> bytes:
    return orjson.dumps({"error": message})


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
