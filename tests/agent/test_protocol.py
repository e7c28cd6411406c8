"""The v2 codec on its own: JSON and binary tensors in, JSON and binary out, every malformed case a 400."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import orjson
import pytest

from agent.errors import InvalidRequest, ValidationError
from agent.protocol import (
    InferRequest,
    InferResponse,
    OutputTensor,
    RequestedOutput,
    build_response,
    decode_request,
    encode_response,
)


def _binary_body(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, int]:
    h = orjson.dumps(header)
    return h + b"".join(chunks), len(h)


def test_json_request_decodes_to_typed_arrays() -> None:
    body = orjson.dumps({"id": "r1", "parameters": {"p": 1},
                         "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3.5, 4]},
                                    {"name": "ids", "datatype": "INT64", "shape": [2], "data": [[7], [8]]},
                                    {"name": "m", "datatype": "BOOL", "shape": [1], "data": [True]}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    req = decode_request(body)
    assert req.id == "r1" and req.parameters == {"p": 1}
    x = req.input("x").data
    assert x.dtype == np.float32 and x.shape == (2, 2) and x[1, 0] == 3.5
    assert req.input("ids").data.dtype == np.int64 and req.input("ids").data.tolist() == [7, 8]
    assert req.input("m").data.dtype == np.bool_
    assert req.outputs == (RequestedOutput("y", True, {"binary_data": True}),)


def test_binary_request_is_zero_copy_and_checked() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([1, 2], dtype=np.int64)
    body, n = _binary_body({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": x.nbytes}},
        {"name": "ids", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": ids.nbytes}},
    ]}, x.tobytes(), ids.tobytes())
    req = decode_request(body, str(n))
    np.testing.assert_array_equal(req.input("x").data, x)
    np.testing.assert_array_equal(req.input("ids").data, ids)
    assert req.input("ids").data.flags.aligned


def test_bytes_tensors_round_trip_in_json_and_binary() -> None:
    words = ["héllo", "", "world"]
    raw = b"".join(struct.pack("<I", len(w.encode())) + w.encode() for w in words)
    body, n = _binary_body({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [3],
                                        "parameters": {"binary_data_size": len(raw)}}]}, raw)
    assert decode_request(body, n).input("t").data.tolist() == words
    req = decode_request(orjson.dumps({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [3], "data": words}]}))
    assert req.input("t").data.tolist() == words
    enc = encode_response(InferResponse("m", "1", (OutputTensor("t", np.array(words, dtype=object), True),)))
    assert b"".join(enc.tail) == raw


@pytest.mark.parametrize(("body", "header_length", "needle"), [
    (b"{not json", None, "malformed JSON"),
    (b"[]", None, "JSON object"),
    (b'{"inputs": {}}', None, "must be a list"),
    (b'{"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}', None, "unknown datatype"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}', None, "non-negative"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', None, "neither 'data'"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}', None, "needs 3"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": ["a", "b"]}]}', None, "not a number"),
    (b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [2], "data": [1.5, 2]}]}', None, "integers"),
    (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]}', None, "out of range"),
    (b'{"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]}', None, "true/false"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [[1], [2, 3]]}]}', None, "regular"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, '
     b'{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', None, "once"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', "zz", "integer"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', "9999", "outside the body"),
])
def test_malformed_requests_are_invalid(body: bytes, header_length: str | None, needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle):
        decode_request(body, header_length)


def test_binary_size_mismatch_and_unclaimed_bytes() -> None:
    body, n = _binary_body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4],
                                        "parameters": {"binary_data_size": 12}}]}, b"\0" * 12)
    with pytest.raises(ValidationError, match="needs 16"):
        decode_request(body, n)
    body, n = _binary_body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                        "parameters": {"binary_data_size": 4}}]}, b"\0" * 8)
    with pytest.raises(InvalidRequest, match="not claimed"):
        decode_request(body, n)
    body, n = _binary_body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                        "parameters": {"binary_data_size": 400}}]}, b"\0" * 4)
    with pytest.raises(ValidationError, match="past the end"):
        decode_request(body, n)


def test_absurd_dims_are_refused_without_allocating() -> None:
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**31, 2**31, 2**31],
                                     "parameters": {"binary_data_size": 4}}]}) + b"\0" * 4
    with pytest.raises(ValidationError, match="needs"):
        decode_request(body, len(body) - 4)


def test_non_finite_outputs_stay_valid_json() -> None:
    out = np.array([1.5, np.nan, np.inf, -np.inf], dtype=np.float32)
    enc = encode_response(InferResponse("m", "1", (OutputTensor("y", out),), id="abc"))
    doc = json.loads(enc.header, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["outputs"][0]["data"] == [1.5, "NaN", "Infinity", "-Infinity"]
    assert doc["id"] == "abc" and enc.header_length is None
    back = decode_request(orjson.dumps({"inputs": [{"name": "y", "datatype": "FP32", "shape": [4],
                                                    "data": doc["outputs"][0]["data"]}]}))
    got = back.input("y").data
    assert got[0] == 1.5 and math.isnan(got[1]) and got[2] == np.inf and got[3] == -np.inf


def test_output_selection_and_binary_flags() -> None:
    req = InferRequest((), (RequestedOutput("b", True), RequestedOutput("a")), "i", {"binary_data_output": False})
    resp = build_response(req, "m", "1", {"a": np.zeros(2, np.float32), "b": np.ones(3, np.int64)})
    assert [(o.name, o.binary) for o in resp.outputs] == [("b", True), ("a", False)]
    enc = encode_response(resp)
    assert enc.header_length == len(enc.header) and enc.content_type == "application/octet-stream"
    doc = json.loads(enc.header)
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 24} and "data" not in doc["outputs"][0]
    assert np.frombuffer(enc.tail[0], np.int64).tolist() == [1, 1, 1]
    req_all = InferRequest((), None, None, {"binary_data_output": True})
    assert all(o.binary for o in build_response(req_all, "m", "1", {"a": np.zeros(1)}).outputs)


def test_fp16_outputs_are_written_exactly() -> None:
    y = np.array([0.1, -2.5, 65504], dtype=np.float16)
    doc = json.loads(encode_response(InferResponse("m", "1", (OutputTensor("y", y),))).header)
    assert np.array(doc["outputs"][0]["data"], dtype=np.float16).tolist() == y.tolist()
    assert doc["outputs"][0]["datatype"] == "FP16"


@pytest.mark.parametrize(("data", "needle"), [
    (["1.5"] * 4, "not a number"),
    ([True, False, True, True], "booleans"),
    ([1.0, "x", 2.0, 3.0], "not a number"),
    ([[1.0, 2.0], [3.0]], "not a regular array"),
    ([1.0, [2.0, 3.0], 4.0], "not a regular array"),
    ([[1.0, 2.0], 3.0, 4.0], "not a regular array"),
], ids=["numeric-strings", "booleans", "mixed", "ragged", "nested-in-flat", "flat-in-nested"])
def test_float_data_must_be_json_numbers(data: list[object], needle: str) -> None:
    """numpy would turn "1.5" or true into a float if asked for float32 directly: a 400, not a guess."""
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": data}]})
    with pytest.raises(ValidationError, match=needle):
        decode_request(body)


def test_float_data_accepts_ints_nested_rows_and_nonfinite_tokens() -> None:
    for data in ([1, 2, 3, 4], [[1.5, 2.5, 3.5, 4.5]], ["NaN", "Infinity", "-Infinity", 0.5]):
        body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": data}]})
        arr = decode_request(body).inputs[0].data
        assert arr.dtype == np.float32 and arr.shape == (1, 4)


@pytest.mark.parametrize(("datatype", "data", "needle"), [
    ("FP32", [1.5, True, 2.0, 3.0], "element 1 is 'True', not a number"),
    ("FP32", [1.5, None, 2.0, 3.0], "element 1 is 'None', not a number"),
    ("FP64", [[1.5, 2.5], [3.5, False]], "element 3 is 'False', not a number"),
    ("INT64", [1, True, 2, 3], "expected integers"),
    ("INT64", [1, 2.5, 2, 3], "expected integers"),
    ("INT64", [1, 2, 3, 2**63], "out of range"),
    ("UINT8", [1, 2, 3, 256], "out of range"),
    ("UINT64", [1, 2, 3, -1], "out of range"),
    ("INT8", [[1, 2], [3, 200]], "out of range"),
    ("BOOL", [True, False, 1, True], "true/false"),
], ids=["fp-bool", "fp-null", "fp-nested-bool", "int-bool", "int-float", "int64-over", "uint8-over", "uint64-neg",
        "int8-nested-over", "bool-int"])
def test_json_types_are_strict_on_every_path(datatype: str, data: list[object], needle: str) -> None:
    """A mixed list must never take a fast path that converts what it should refuse ([1.5, true] did)."""
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": datatype, "data": data}]})
    with pytest.raises(ValidationError, match=needle):
        decode_request(body)


def test_json_numbers_decode_exactly_in_every_layout() -> None:
    cases: list[tuple[str, object, np.ndarray]] = [
        ("FP32", [[0.1, -2.5], [3e38, 7]], np.array([[0.1, -2.5], [3e38, 7]], np.float32)),
        ("FP64", [0.1, 1e-300, -0.0, 2**60], np.array([0.1, 1e-300, -0.0, 2**60], np.float64)),
        ("INT64", [[-2**63, 2**63 - 1], [0, 5]], np.array([[-2**63, 2**63 - 1], [0, 5]], np.int64)),
        ("UINT64", [0, 2**64 - 1, 1, 2], np.array([0, 2**64 - 1, 1, 2], np.uint64)),
        ("INT8", [-128, 127, 0, 1], np.array([-128, 127, 0, 1], np.int8)),
        ("FP16", [0.5, 1, 2, 65504], np.array([0.5, 1, 2, 65504], np.float16)),
    ]
    for datatype, data, want in cases:
        body = orjson.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": datatype, "data": data}]})
        got = decode_request(body).inputs[0].data
        assert got.dtype == want.dtype and got.shape == (2, 2), datatype
        np.testing.assert_array_equal(got, want.reshape(2, 2))


def test_empty_shapes_that_numpy_cannot_hold_are_refused() -> None:
    for shape in ([0, 2**62, 2**62], [2**62, 0, 2**62, 2**62]):
        body = orjson.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]})
        with pytest.raises(ValidationError, match=r"'x': shape .* is too big"):
            decode_request(body)
    ok = decode_request(orjson.dumps({"inputs": [{"name": "x", "shape": [0, 3], "datatype": "INT32", "data": []}]}))
    assert ok.inputs[0].data.shape == (0, 3) and ok.inputs[0].data.dtype == np.int32


def test_non_finite_outputs_are_written_from_numpy_in_place() -> None:
    out = np.array([[1.5, np.nan], [-np.inf, 2.25]], dtype=np.float16)
    doc = json.loads(encode_response(InferResponse("m", "1", (OutputTensor("y", out),))).header)
    assert doc["outputs"][0]["data"] == [1.5, "NaN", "-Infinity", 2.25]


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split documents over 2 KB into ~256-byte pieces, so the big-body path runs on small bodies."""
    from agent import json_tensors
    monkeypatch.setattr(json_tensors, "SPLIT_BYTES", 2048)
    monkeypatch.setattr(json_tensors, "PIECE_BYTES", 256)


@pytest.mark.usefixtures("small_pieces")
def test_big_arrays_parsed_in_pieces_decode_exactly_as_whole() -> None:
    from agent import json_tensors
    x = np.random.default_rng(4).standard_normal((3, 400)).astype(np.float32)
    ids = np.arange(-600, 600, dtype=np.int64).reshape(2, 600)
    doc = {"id": "r", "parameters": {"data": [1, 2, 3], "note": '"data": [9]'},
           "inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 400], "data": x.ravel()},
                      {"parameters": {"k": 1}, "name": "ids", "datatype": "INT64", "shape": [2, 600],
                       "data": ids.ravel()}]}
    body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2)
    spans = json_tensors._flat_array_spans(body)
    assert len(spans) == 2  # both big arrays are cut; the small one in parameters is not
    req = decode_request(body)
    np.testing.assert_array_equal(req.input("x").data, x)
    np.testing.assert_array_equal(req.input("ids").data, ids)
    assert req.parameters == {"data": [1, 2, 3], "note": '"data": [9]'} and req.id == "r"


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize(("data", "needle"), [
    (b"[" + b"1.5," * 699 + b"true]", "element 699 is 'True', not a number"),
    (b"[" + b"1.5," * 701 + b"]", "malformed JSON"),
    (b"[" + b"1.5," * 700 + b",1.5]", "malformed JSON"),
    (b"[" + b"1.5," * 700 + b"1.5 2.5]", "malformed JSON"),
    (b"[" + b"1.5," * 300 + b"1e999," + b"1.5," * 399 + b"1.5]", "malformed JSON"),
    (b"[" + b"1.5," * 700 + b"1.5]", "has 701 elements"),
], ids=["bool", "trailing-comma", "double-comma", "missing-comma", "number-overflow", "count"])
def test_big_arrays_parsed_in_pieces_keep_every_rule(data: bytes, needle: str) -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 350], "data": ' + data + b"}]}"
    assert len(body) > 2048
    with pytest.raises(InvalidRequest, match=needle):
        decode_request(body)


@pytest.mark.usefixtures("small_pieces")
def test_a_cut_that_is_not_an_inputs_data_falls_back_to_the_whole_parse() -> None:
    """"data" in the parameters of the request, a nested array, NaN tokens: parsed whole, still exact."""
    x = np.arange(700, dtype=np.float32)
    body = orjson.dumps({"parameters": {"data": list(range(700))},
                         "inputs": [{"name": "x", "datatype": "FP32", "shape": [700], "data": x.tolist()}]})
    req = decode_request(body)
    assert req.parameters["data"] == list(range(700))
    np.testing.assert_array_equal(req.input("x").data, x)
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 350],
                                     "data": x.reshape(2, 350).tolist()}]})
    np.testing.assert_array_equal(decode_request(body).input("x").data, x.reshape(2, 350))
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [700],
                                     "data": ["NaN", *x.tolist()[1:]]}]})
    got = decode_request(body).input("x").data
    assert np.isnan(got[0]) and np.array_equal(got[1:], x[1:])


def test_json_numbers_go_into_numpy_without_a_python_object_each() -> None:
    """One 224x224x3 image: Python's allocator (and numpy's, which tracemalloc also sees) peaks at the
    float64 staging buffer plus the float32 result (3 x the tensor), where a float object per number
    (orjson + np.asarray) peaked at 24 MB (40 x)."""
    import tracemalloc
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    body = orjson.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                                     "data": x.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY)
    decode_request(body)  # warm: the parser's buffers are not what is measured
    tracemalloc.start()
    try:
        got = decode_request(body).inputs[0].data
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, x)
    assert peak < 4 * x.nbytes, f"peak {peak} bytes for a {x.nbytes}-byte tensor"


def test_keys_with_nul_characters_are_plain_keys() -> None:
    """Found by the fuzz test: simdjson cannot look a key with a NUL up by name (it was a 500)."""
    body = b'{"inputs": [{"\\u0000": null, "name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}],' \
           b' "parameters": {"a\\u0000b": 1}}'
    req = decode_request(body)
    assert req.parameters == {"a\x00b": 1}
    np.testing.assert_array_equal(req.input("x").data, np.array([1, 2], np.float32))
    with pytest.raises(InvalidRequest, match="string 'name'"):
        decode_request(b'{"inputs": [{"\\u0000": null}]}')
