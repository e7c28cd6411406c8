"""Fuzz the agent's HTTP API with hypothesis: whatever a client sends, never a 5xx for its mistake.

Generated requests go to every v2 route of a real server (MLP, an INT64/BOOL model and a
two-input model) with v2-shaped bodies whose every field can be wrong in type, size or
value (shapes with huge, zero and negative dims; data of mixed JSON types, nested or
ragged; binary tails of any length; bogus header lengths, encodings, deadlines), plus
raw bytes. Every answer must be below 500 (503 and 504 are the server's own state and
the client's own deadline, not a crash) and, when not 2xx, a JSON `{"error": str}`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bundle
from agent import DataPlane, ModelConfig, ServerConfig
from agent.http_server import HttpServer

pytestmark = pytest.mark.timeout(600)

MODELS = ("mlp", "types", "multi_io")
INPUT_NAMES = ("input", "tokens", "mask", "features", "ids", "x", "")
DATATYPES = ("FP32", "FP16", "FP64", "INT64", "INT32", "UINT8", "UINT64", "BOOL", "BYTES", "fp32", "BF16")


class _ServerThread:
    """An HttpServer on its own event loop in a thread, so that hypothesis can drive it synchronously."""

    def __init__(self, dirs: list[pathlib.Path], trust: list[bundle.TrustAnchor]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._call(self._start(dirs, trust))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _start(self, dirs: list[pathlib.Path], trust: list[bundle.TrustAnchor]) -> HttpServer:
        dp = DataPlane()
        for d in dirs:
            dp.load_bundle(bundle.verify(d, trust), ModelConfig(max_queue=1024))
        server = HttpServer(dp, ServerConfig(port=0, max_body_bytes=1 << 20))
        await server.start()
        return server

    def close(self) -> None:
        self._call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def server(bundles: dict[str, pathlib.Path], keypair: tuple[pathlib.Path, pathlib.Path]) -> Iterator[_ServerThread]:
    s = _ServerThread([bundles[m] for m in MODELS], bundle.anchors([keypair[1]]))
    yield s
    s.close()


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "1.5", "", "x" * 30]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=24)
dims = st.one_of(st.integers(min_value=0, max_value=70), st.sampled_from([0, 1, 2, 64, 2**31, 2**62, 2**63]),
                 st.integers(min_value=-3, max_value=-1))
numbers = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False), st.integers(-300, 300))
data_values = st.one_of(
    st.lists(numbers, max_size=200),
    st.lists(st.lists(numbers, min_size=1, max_size=70), max_size=4),
    st.lists(json_scalars, max_size=70),
    json_values,
)


@st.composite
def infer_inputs(draw: st.DrawFn) -> dict[str, Any]:
    inp: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        inp["name"] = draw(st.one_of(st.sampled_from(INPUT_NAMES), json_scalars))
    if draw(st.integers(0, 9)):
        inp["datatype"] = draw(st.one_of(st.sampled_from(DATATYPES), json_scalars))
    if draw(st.integers(0, 9)):
        inp["shape"] = draw(st.one_of(st.lists(dims, max_size=5), json_values))
    if draw(st.integers(0, 5)):
        inp["data"] = draw(data_values)
    if not draw(st.integers(0, 4)):
        inp["parameters"] = draw(st.one_of(
            st.fixed_dictionaries({"binary_data_size": st.one_of(st.integers(-2, 600), json_scalars)}), json_values))
    return inp


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    model = draw(st.one_of(st.sampled_from(MODELS), st.sampled_from(["nope", "%00", "..", "a" * 300])))
    version = draw(st.one_of(st.none(), st.sampled_from(["1.0.0", "9", "%2F"])))
    base = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    method, path = draw(st.sampled_from([
        ("POST", base + "/infer"), ("POST", base + "/infer"), ("POST", base + "/infer"), ("GET", base),
        ("GET", base + "/ready"), ("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"),
        ("DELETE", base + "/infer"), ("GET", "/metrics"), ("PUT", "/v2/models"), ("GET", "/v2/repository/index"),
    ]))
    headers: dict[str, str] = {}
    kind = draw(st.sampled_from(["v2", "v2", "v2", "binary", "json", "raw"]))
    if kind == "raw":
        body = draw(st.binary(max_size=300))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    else:
        doc: dict[str, Any] = {"inputs": draw(st.one_of(st.lists(infer_inputs(), max_size=3), json_values))}
        if draw(st.booleans()):
            doc["outputs"] = draw(st.one_of(st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from(["logits", "total", "label", "nope"])},
                optional={"parameters": st.fixed_dictionaries({"binary_data": json_scalars})}), max_size=3),
                json_values))
        if draw(st.booleans()):
            doc["parameters"] = draw(json_values)
        if draw(st.booleans()):
            doc["id"] = draw(json_scalars)
        body = json.dumps(doc).encode()
        if kind == "binary":
            tail = draw(st.binary(max_size=600))
            headers["Inference-Header-Content-Length"] = str(draw(st.one_of(
                st.just(len(body)), st.integers(-1, len(body) + len(tail) + 2))))
            body += tail
    if draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from(
            ["application/json", "application/octet-stream", "text/plain", "application/json; charset=utf-8", "x"]))
    if not draw(st.integers(0, 5)):
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "br", "deflate", "identity", "zstd", "x"]))
    if not draw(st.integers(0, 5)):
        headers["Outpost-Timeout-Ms"] = draw(st.sampled_from(["0", "-1", "nan", "inf", "1e9", "0.0001", "x", "50"]))
    return method, path, body, headers


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(req=requests())
def test_no_client_mistake_is_a_5xx_and_every_error_is_json(server: _ServerThread,
                                                            req: tuple[str, str, bytes, dict[str, str]]) -> None:
    method, path, body, headers = req
    conn = http.client.HTTPConnection("127.0.0.1", server.server.port, timeout=30)
    try:
        conn.request(method, path, body=body if method != "GET" else None, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    assert resp.status < 500 or resp.status in (503, 504), (resp.status, payload[:300], req)
    if resp.status >= 400:
        assert resp.getheader("Content-Type", "").startswith("application/json"), (resp.status, payload[:200], req)
        assert isinstance(json.loads(payload)["error"], str), payload[:200]
