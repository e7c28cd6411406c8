"""No 5xx for a client's mistake, and every non-2xx answer a JSON body (issue 9, THREATS 28-32).

Against a real server on loopback: shapes numpy cannot even describe, bodies that lie about
their Content-Encoding, requests the HTTP parser refuses, connections over the cap, bodies
over the byte budget; afterwards a normal request is still answered exactly.
"""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import numpy as np
import orjson
import pytest

from agent import ServerConfig
from tests.agent.conftest import ServeFactory, tensor
from tests.agent.test_http_bad_input import GOOD, _assert_exact

HLEN = "Inference-Header-Content-Length"
HUGE = [0, 2**62, 2**62]


async def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], Any]:
    """One hand-written HTTP/1.1 exchange: status, headers, JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, orjson.loads(body)


async def test_zero_sized_dims_with_huge_others_are_a_named_400(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], reference: Any) -> None:
    served = await serve([bundles["mlp"]])
    status, doc = await served.infer_json("mlp", [{"name": "input", "datatype": "FP32", "shape": HUGE, "data": []}])
    assert status == 400 and "'input'" in doc["error"] and "too big" in doc["error"], doc
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": HUGE,
                                       "parameters": {"binary_data_size": 0}}]})
    async with served.session.post(served.url + "/v2/models/mlp/infer", data=header, headers={
            HLEN: str(len(header)), "Content-Type": "application/octet-stream"}) as r:
        assert r.status == 400 and "'input'" in (await r.json())["error"]
    await _assert_exact(served, reference)


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
async def test_a_body_that_is_not_what_its_content_encoding_says_is_400(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], reference: Any, encoding: str) -> None:
    served = await serve([bundles["mlp"]])
    async with served.session.post(served.url + "/v2/models/mlp/infer", data=orjson.dumps({"inputs": GOOD}),
                                   headers={"Content-Type": "application/json",
                                            "Content-Encoding": encoding}) as r:
        assert r.status == 400, await r.text()
        assert r.content_type == "application/json"
        assert encoding in (await r.json())["error"]
    await _assert_exact(served, reference)


async def test_every_non_2xx_answer_is_json(serve: ServeFactory, bundles: dict[str, pathlib.Path],
                                            reference: Any) -> None:
    served = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, max_field_bytes=1024))
    s, url, port = served.session, served.url, served.server.port
    for method, path in (("GET", "/v2/models/mlp/infer"), ("DELETE", "/v2"), ("PUT", "/v2/health/live"),
                         ("GET", "/v2/models/mlp/versions/9/ready"), ("POST", "/metrics")):
        async with s.request(method, url + path) as r:
            assert r.status >= 400 and r.content_type == "application/json", (method, path, r.status)
            assert isinstance((await r.json())["error"], str)
    # what aiohttp's HTTP parser refuses never reaches a handler: its answers are JSON too
    for request in (b"GARBAGE\r\n\r\n",
                    b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n",
                    b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"):
        status, headers, doc = await _raw(port, request)
        assert 400 <= status < 500 and headers["content-type"].startswith("application/json"), (request[:20], status)
        assert isinstance(doc["error"], str)
    # a model that is not ready: 503 with a JSON body
    served.dataplane.begin_drain()
    async with s.get(url + "/v2/health/ready") as r:
        assert r.status == 503 and "error" in await r.json()
    async with s.post(url + "/v2/models/mlp/infer", json={"inputs": GOOD}) as r:
        assert r.status == 503 and "error" in await r.json() and int(r.headers["Retry-After"]) >= 1


async def test_connections_over_the_cap_get_a_json_503(serve: ServeFactory, bundles: dict[str, pathlib.Path],
                                                       reference: Any) -> None:
    served = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, max_connections=2))
    port = served.server.port
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await asyncio.sleep(0.1)
    status, headers, doc = await _raw(port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 503 and "2 connections" in doc["error"] and headers["retry-after"] == "1"
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.2)
    await _assert_exact(served, reference)


async def test_bodies_over_the_byte_budget_wait_briefly_then_are_503_unread(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], reference: Any) -> None:
    served = await serve([bundles["mlp"]], server_config=ServerConfig(
        port=0, max_body_bytes=256 << 10, max_inflight_body_bytes=256 << 10, body_budget_wait_s=0.05))
    port = served.server.port
    body = orjson.dumps({"inputs": [tensor("input", np.zeros((8, 64), np.float32))]})
    big = body + b" " * (200_000 - len(body))  # valid JSON, 200 KB: most of the budget
    # a slow client declares 200 KB and sends half: its bytes are held while it trickles
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(big) + big[:100_000])
    await writer.drain()
    await asyncio.sleep(0.2)
    async with served.session.post(served.url + "/v2/models/mlp/infer", data=big,
                                   headers={"Content-Type": "application/json"}) as r:
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        assert "memory budget" in (error := (await r.json())["error"]) and "after waiting 0.05 s" in error
    writer.write(big[100_000:])
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert b" 200 " in status_line
    writer.close()
    async with served.session.post(served.url + "/v2/models/mlp/infer", data=big,  # the budget came back
                                   headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200
    await _assert_exact(served, reference)
