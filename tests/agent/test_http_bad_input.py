"""Every bad input of the issue against a real server on loopback; afterwards a normal request is still exact.

Each case checks the status, that the body is JSON `{"error": ...}`, and that the
message names the input and what was expected.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import pathlib
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from agent import ModelConfig, ServerConfig
from tests.agent.conftest import ServeFactory, tensor

X = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
GOOD = [tensor("input", X)]


def _row(n: int = 64, value: float = 0.5) -> list[float]:
    return [value] * n


BAD_JSON_CASES: list[tuple[str, list[dict[str, Any]], int, tuple[str, ...]]] = [
    ("missing input", [], 400, ("'input'", "missing")),
    ("extra input", [*GOOD, tensor("extra", X)], 400, ("'extra'", "not an input")),
    ("wrong dtype", [tensor("input", X.astype(np.int64), "INT64")], 400, ("'input'", "expected datatype FP32")),
    ("wrong rank", [{"name": "input", "datatype": "FP32", "shape": [1, 1, 64], "data": _row()}], 400,
     ("'input'", "expected rank 2")),
    ("wrong shape", [{"name": "input", "datatype": "FP32", "shape": [1, 63], "data": _row(63)}], 400,
     ("'input'", "dimension 1 must be 64")),
    ("length vs shape", [{"name": "input", "datatype": "FP32", "shape": [2, 64], "data": _row(64)}], 400,
     ("'input'", "needs 128")),
    ("absurd dims", [{"name": "input", "datatype": "FP32", "shape": [2**40, 64], "data": _row()}], 400,
     ("'input'", "needs")),
    ("zero batch", [{"name": "input", "datatype": "FP32", "shape": [0, 64], "data": []}], 400,
     ("'input'", "empty")),
    ("non-finite", [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ["NaN", *_row(63)]}], 400,
     ("'input'", "non-finite")),
    ("strings for floats", [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ["a"] * 64}], 400,
     ("'input'", "not a number")),
]


async def _assert_exact(served: Any, reference: Any) -> None:
    status, doc = await served.infer_json("mlp", GOOD)
    assert status == 200, doc
    want = reference("mlp", {"input": X})["logits"]
    got = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(doc["outputs"][0]["shape"])
    np.testing.assert_array_equal(got, want)


async def test_every_bad_input_is_a_named_400_and_the_server_keeps_serving(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], reference: Any) -> None:
    served = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, max_body_bytes=1 << 20))
    for label, inputs, status, needles in BAD_JSON_CASES:
        got, doc = await served.infer_json("mlp", inputs)
        assert got == status, (label, doc)
        assert set(doc) == {"error"}, label
        for needle in needles:
            assert needle in doc["error"], (label, doc["error"])
    got, doc = await served.infer_json("mlp", GOOD, outputs=[{"name": "nope"}])
    assert got == 400 and "'nope'" in doc["error"] and "logits" in doc["error"]
    await _assert_exact(served, reference)


async def test_protocol_level_errors(serve: ServeFactory, bundles: dict[str, pathlib.Path], reference: Any) -> None:
    served = await serve([bundles["mlp"]])
    url = served.url + "/v2/models/mlp/infer"
    s = served.session
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("malformed JSON", {"data": b"{\"inputs\": [", "headers": {"Content-Type": "application/json"}}, 400,
         "malformed JSON"),
        ("wrong content type", {"data": b"x=1", "headers": {"Content-Type": "text/plain"}}, 400,
         "content type"),
        ("form body", {"data": {"a": "b"}}, 400, "content type"),
        ("bad header length", {"data": orjson.dumps({"inputs": GOOD}), "headers": {
            "Inference-Header-Content-Length": "abc", "Content-Type": "application/octet-stream"}}, 400, "integer"),
        ("bad timeout header", {"json": {"inputs": GOOD}, "headers": {"Outpost-Timeout-Ms": "soon"}}, 400,
         "Outpost-Timeout-Ms"),
    ]
    for label, kwargs, status, needle in cases:
        async with s.post(url, **kwargs) as r:
            assert r.status == status, label
            assert r.content_type == "application/json", label
            assert needle in (await r.json())["error"], label
    for path, needle in (("/v2/models/nope/infer", "'nope'"), ("/v2/models/mlp/versions/9.9.9/infer", "9.9.9")):
        async with s.post(served.url + path, json={"inputs": GOOD}) as r:
            assert r.status == 404 and needle in (await r.json())["error"]
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/mlp/versions/2.0.0/ready", "/nowhere"):
        async with s.get(served.url + path) as r:
            assert r.status == 404 and "error" in await r.json()
    await _assert_exact(served, reference)


async def test_binary_length_mismatch_is_400(serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    served = await serve([bundles["mlp"]])
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                                       "parameters": {"binary_data_size": 256}}]})
    body = header + X[:1].tobytes()
    async with served.session.post(served.url + "/v2/models/mlp/infer", data=body, headers={
            "Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}) as r:
        assert r.status == 400
        assert "shape [2, 64] of FP32 needs 512" in (await r.json())["error"]


async def test_oversized_body_is_413_before_it_is_read(serve: ServeFactory, bundles: dict[str, pathlib.Path],
                                                        reference: Any) -> None:
    served = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, max_body_bytes=64 * 1024))
    port = served.server.port
    # Declare 200 MB, send only the headers: the answer must come without the body.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 200000000\r\n\r\n")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert b" 413 " in status_line
    writer.close()
    # Chunked (no Content-Length): stopped while streaming.
    async def chunks() -> Any:
        for _ in range(100):
            yield b"[" * 4096

    async with served.session.post(served.url + "/v2/models/mlp/infer", data=chunks(),
                                   headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413 and "limit" in (await r.json())["error"]
    # A small gzip body that inflates past the limit (decompression bomb).
    bomb = gzip.compress(b" " * (4 << 20))
    async with served.session.post(served.url + "/v2/models/mlp/infer", data=bomb, headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip"}) as r:
        assert r.status == 413
    await _assert_exact(served, reference)


async def test_nan_outputs_are_valid_json(serve: ServeFactory, bundles: dict[str, pathlib.Path],
                                          reference: Any) -> None:
    served = await serve([bundles["mlp"]])
    x = np.full((1, 64), 3e38, dtype=np.float32)  # finite in, overflow inside: Inf and NaN out
    want = reference("mlp", {"input": x})["logits"]
    assert not np.isfinite(want).all()
    async with served.session.post(served.url + "/v2/models/mlp/infer",
                                   json={"inputs": [tensor("input", x)]}) as r:
        assert r.status == 200
        text = await r.text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    data = doc["outputs"][0]["data"]
    got = np.array([float(v) for v in data], dtype=np.float32)
    np.testing.assert_array_equal(got, want.ravel())
    async with served.session.get(served.url + "/metrics") as r:
        assert "outpost_nonfinite_output_values_total" in await r.text()


async def test_bearer_token(serve: ServeFactory, bundles: dict[str, pathlib.Path], reference: Any) -> None:
    served = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, token="s3cret"))
    s = served.session
    async with s.get(served.url + "/v2/health/ready") as r:
        assert r.status == 200  # probes stay open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        async with s.post(served.url + "/v2/models/mlp/infer", json={"inputs": GOOD}, headers=headers) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        async with s.get(served.url + "/metrics", headers=headers) as r:
            assert r.status == 401
    status, _doc = await served.infer_json("mlp", GOOD, headers={"Authorization": "Bearer s3cret"})
    assert status == 200


async def test_tls(serve: ServeFactory, bundles: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    served = await serve([bundles["mlp"]], server_config=ServerConfig(
        port=0, tls_cert=str(cert_path), tls_key=str(key_path)))
    ctx = ssl.create_default_context(cafile=str(cert_path))
    async with aiohttp.ClientSession() as s:
        url = f"https://localhost:{served.server.port}"
        async with s.post(url + "/v2/models/mlp/infer", json={"inputs": GOOD}, ssl=ctx) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"http://localhost:{served.server.port}/v2/health/live") as r:
                await r.read()


async def test_binds_loopback_by_default() -> None:
    assert ServerConfig().host == "127.0.0.1"


async def test_models_side_by_side_and_versions(serve: ServeFactory, bundles: dict[str, pathlib.Path],
                                                reference: Any) -> None:
    served = await serve([bundles["mlp"], bundles["multi_io"], bundles["types"]],
                         model_config=ModelConfig(instances=2))
    feats = np.arange(16, dtype=np.float32).reshape(2, 8)
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int64)
    status, doc = await served.infer_json(
        "multi_io", [tensor("features", feats), tensor("ids", ids, "INT64")], version="1.0.0",
        outputs=[{"name": "label"}])
    assert status == 200
    want = reference("multi_io", {"features": feats, "ids": ids})
    assert [o["name"] for o in doc["outputs"]] == ["label"]
    assert doc["outputs"][0]["data"] == want["label"].tolist() and doc["model_version"] == "1.0.0"
    tokens = np.array([[1, 2, 3]], dtype=np.int64)
    mask = np.array([[True, False, True]])
    status, doc = await served.infer_json("types", [tensor("tokens", tokens, "INT64"), tensor("mask", mask, "BOOL")])
    assert status == 200 and doc["outputs"][0]["data"] == [4]
    status, doc = await served.infer_json("types", [tensor("tokens", tokens, "INT64"),
                                                    tensor("mask", np.array([[True, False]]), "BOOL")])
    assert status == 400 and "'seq'" in doc["error"] and "'tokens'" in doc["error"]
    async with served.session.get(served.url + "/v2/models/multi_io/versions/1.0.0") as r:
        meta = await r.json()
    assert meta["inputs"][1] == {"name": "ids", "datatype": "INT64", "shape": [-1, 4]}
    assert meta["outpost"]["verified"] is True and meta["outpost"]["instances"] == 2
    await _assert_exact(served, reference)
