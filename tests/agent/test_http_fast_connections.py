"""Connections on the fast path (agent.fast_http): raw HTTP/1.x bytes against a real server.

Small plain inference requests are answered by the httptools protocol; anything else hands
the connection, from that request's first byte, to aiohttp. These tests speak raw bytes so
that framing, pipelining, keep-alive and the hand-off are seen exactly as a client sees them,
and they read the front's counters to know which side answered.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import ssl
import subprocess
from typing import Any

import numpy as np
import orjson
import pytest

from agent import ServerConfig, fast_http
from tests.agent.conftest import Served, ServeFactory
from tests.agent.test_http_bad_input import GOOD, X

BODY = orjson.dumps({"inputs": GOOD})


def post(body: bytes = BODY, path: str = "/v2/models/mlp/infer", version: bytes = b"1.1",
         extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/%s\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), version, len(body), extra, body))


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def connect(served: Served, tls: ssl.SSLContext | None = None
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", served.server.port, ssl=tls)


def logits(body: bytes) -> np.ndarray:
    out = json.loads(body)["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


@pytest.fixture
def want(reference: Any) -> np.ndarray:
    return np.asarray(reference("mlp", {"input": X})["logits"])


async def test_plain_inference_is_served_on_the_fast_path_with_keep_alive(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], want: np.ndarray) -> None:
    served = await serve([bundles["mlp"]])
    front = served.server.front
    assert front is not None
    reader, writer = await connect(served)
    version = served.dataplane.models()[0].version
    for path in ("/v2/models/mlp/infer", f"/v2/models/mlp/versions/{version}/infer"):
        writer.write(post(path=path))
        status, headers, body = await read_response(reader)
        assert status == 200 and headers["content-type"] == "application/json" and "date" in headers
        assert "connection" not in headers  # HTTP/1.1: kept alive
        np.testing.assert_array_equal(logits(body), want)
    assert (front.served, front.handed_off) == (2, 0)
    assert len(front.connections) == 1
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")  # handed off: aiohttp serves the rest
    status, _, body = await read_response(reader)
    assert status == 200
    assert b"outpost_http_fast_requests_total 2.0" in body and b"outpost_http_fast_handed_off_total 1.0" in body
    writer.close()


async def test_pipelined_requests_are_answered_in_order_and_close_is_honoured(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], want: np.ndarray) -> None:
    served = await serve([bundles["mlp"]])
    reader, writer = await connect(served)
    bad = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]})
    writer.write(post() + post(bad) + post() + post(extra=b"Connection: close\r\n") + post())
    answers = [await read_response(reader) for _ in range(4)]
    assert [a[0] for a in answers] == [200, 400, 200, 200]
    assert "input" in json.loads(answers[1][2])["error"]
    assert answers[3][1]["connection"] == "close"
    for status, _, body in answers:
        if status == 200:
            np.testing.assert_array_equal(logits(body), want)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the fourth; the fifth is never answered
    writer.close()
    front = served.server.front
    assert front is not None and front.served == 4


async def test_http_1_0_keeps_alive_only_when_asked(serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    served = await serve([bundles["mlp"]])
    reader, writer = await connect(served)
    writer.write(post(version=b"1.0", extra=b"Connection: keep-alive\r\n"))
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "keep-alive"
    writer.write(post(version=b"1.0"))
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


@pytest.mark.parametrize("other", [
    pytest.param(b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n", id="another-route"),
    pytest.param(post(path="/v2/models/mlp/infer?x=1"), id="a-query"),
    pytest.param(post(extra=b"Expect: 100-continue\r\n"), id="expect"),
    pytest.param(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY), id="chunked"),
])
async def test_anything_else_hands_the_connection_to_aiohttp_in_order(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], want: np.ndarray, other: bytes) -> None:
    served = await serve([bundles["mlp"]])
    front = served.server.front
    assert front is not None
    reader, writer = await connect(served)
    writer.write(post() + other + post())  # fast, then the other one and everything after it on aiohttp
    first = await read_response(reader)
    if b"Expect" in other:
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100")
    second, third = await read_response(reader), await read_response(reader)
    assert [first[0], second[0], third[0]] == [200, 200, 200]
    assert "server" not in first[1] and "aiohttp" in third[1]["server"]  # who answered
    np.testing.assert_array_equal(logits(third[2]), want)
    assert (front.served, front.handed_off) == (1, 1)
    assert not front.connections
    writer.close()


async def test_a_request_in_pieces_waits_briefly_then_goes_to_aiohttp(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], want: np.ndarray,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_http, "PARTIAL_GRACE_S", 0.3)
    served = await serve([bundles["mlp"]])
    front = served.server.front
    assert front is not None
    request = post()
    reader, writer = await connect(served)
    for cut in (20, len(request) - 10):  # in the header block, then in the body: each completed within the grace
        writer.write(request[:cut])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(request[cut:])
        status, headers, body = await read_response(reader)
        assert status == 200 and "server" not in headers
        np.testing.assert_array_equal(logits(body), want)
    assert (front.served, front.handed_off) == (2, 0)
    writer.write(request[:-10])  # then one that stays incomplete past the grace
    await writer.drain()
    await asyncio.sleep(0.6)
    assert front.handed_off == 1
    writer.write(request[-10:])
    status, headers, body = await read_response(reader)
    assert status == 200 and "aiohttp" in headers["server"]
    np.testing.assert_array_equal(logits(body), want)
    writer.close()


async def test_a_big_body_goes_to_aiohttp(serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    served = await serve([bundles["mlp"]])
    front = served.server.front
    assert front is not None
    big = b'{"inputs": [], "pad": "' + b"x" * (fast_http.SMALL_BODY_BYTES + 10) + b'"}'
    reader, writer = await connect(served)
    writer.write(post(big))  # not a valid request: aiohttp streams it in and answers 400
    status, headers, body = await read_response(reader)
    assert status == 400 and "aiohttp" in headers["server"] and json.loads(body)["error"]
    assert (front.served, front.handed_off) == (0, 1)
    writer.close()


@pytest.mark.parametrize("request_bytes,status", [
    pytest.param(post(extra=b"".join(b"X-%d: y\r\n" % i for i in range(70))), 400, id="too-many-headers"),
    pytest.param(post(extra=b"X-Big: " + b"y" * 9000 + b"\r\n"), 400, id="header-too-long"),
    pytest.param(post(extra=b"Content-Length: 3\r\n"), 400, id="two-content-lengths"),
    pytest.param(b"POST /v2/models/mlp/infer HTTP/1.1\nHost: t\nContent-Length: 2\n\n{}", 400, id="bare-LF"),
    pytest.param(b"BREW /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\n\r\n", 400, id="unknown-method"),
    pytest.param(post(extra=b"Transfer-Encoding: chunked\r\n"), 400, id="length-and-chunked"),
    pytest.param(post().replace(b"Content-Length: ", b"Content-Length: +"), 400, id="signed-length"),
    pytest.param(post().replace(b"Content-Length: ", b"Content-Length: 0x"), 400, id="hex-length"),
    pytest.param(post().replace(b"Content-Length:", b"Content-Length :"), 400, id="space-before-colon"),
])
async def test_malformed_requests_get_aiohttps_json_errors_and_the_server_goes_on(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], request_bytes: bytes, status: int) -> None:
    served = await serve([bundles["mlp"]])
    reader, writer = await connect(served)
    writer.write(request_bytes)
    got, headers, body = await read_response(reader)
    assert got == status and headers["content-type"].startswith("application/json"), body
    assert json.loads(body)["error"]
    writer.close()
    reader, writer = await connect(served)
    writer.write(post())
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_idle_fast_connections_close_after_the_keepalive_timeout(
        serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    served = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, keepalive_timeout_s=0.3))
    reader, writer = await connect(served)
    for _ in range(4):  # activity keeps it open past one timeout
        writer.write(post())
        assert (await read_response(reader))[0] == 200
        await asyncio.sleep(0.1)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then idle: closed
    writer.close()
    front = served.server.front
    assert front is not None and not front.connections


async def test_a_waiting_request_finishes_and_a_disconnect_cancels_it(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that wait (here: a data plane that sleeps) go on as tasks: answered in order, or
    cancelled when the client leaves."""
    served = await serve([bundles["mlp"]])
    real = served.dataplane.infer
    cancelled: list[bool] = []

    async def slow(*args: Any, **kwargs: Any) -> Any:
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return await real(*args, **kwargs)

    monkeypatch.setattr(served.dataplane, "infer", slow)
    reader, writer = await connect(served)
    writer.write(post() + post())
    assert [(await read_response(reader))[0] for _ in range(2)] == [200, 200]
    writer.write(post())
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    for _ in range(100):
        if cancelled:
            break
        await asyncio.sleep(0.01)
    assert cancelled == [True]
    front = served.server.front
    assert front is not None and not front.connections


async def test_thousands_of_pipelined_requests_are_answered_in_order(
        serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    """3 MB of requests in one write: the server reads them in pieces cut anywhere (mid-header,
    mid-body), waits for each one's rest, and answers every one, in order, on the fast path."""
    served = await serve([bundles["mlp"]])
    reader, writer = await connect(served)
    n = 3000
    bodies = [orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                        "data": [float(i)] * 64}]}) for i in range(n)]
    sending = asyncio.ensure_future(_send(writer, b"".join(post(b) for b in bodies)))
    answers = [await read_response(reader) for _ in range(n)]
    await sending
    assert [a[0] for a in answers] == [200] * n
    firsts = [json.loads(a[2])["outputs"][0]["data"][0] for a in answers]
    assert len(set(firsts)) == n  # each answer is its own request's (inputs differ, so do outputs)
    again = [await _first_logit(served, i) for i in (0, n // 2, n - 1)]
    assert again == [firsts[0], firsts[n // 2], firsts[n - 1]]  # and in the order sent
    front = served.server.front
    assert front is not None and (front.served, front.handed_off) == (n + 3, 0)
    writer.close()


async def _first_logit(served: Served, i: int) -> float:
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [float(i)] * 64}]}
    async with served.session.post(served.url + "/v2/models/mlp/infer", json=doc) as r:
        return float((await r.json())["outputs"][0]["data"][0])


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def test_fast_connections_count_against_the_connection_cap(
        serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    served = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, max_connections=2))
    held = [await connect(served) for _ in range(2)]
    for reader, writer in held:
        writer.write(post())
        assert (await read_response(reader))[0] == 200
    reader, writer = await connect(served)
    status, _, body = await read_response(reader)
    assert status == 503 and "2 connections" in json.loads(body)["error"]
    for _, w in held:
        w.close()
    writer.close()


async def test_stop_closes_fast_connections(serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    served = await serve([bundles["mlp"]])
    reader, writer = await connect(served)
    writer.write(post())
    assert (await read_response(reader))[0] == 200
    await served.server.stop()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    writer.close()


async def test_access_log_turns_the_fast_path_off(serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    served = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, access_log=True))
    assert served.server.front is None
    reader, writer = await connect(served)
    writer.write(post())
    status, headers, _ = await read_response(reader)
    assert status == 200 and "aiohttp" in headers["server"]
    writer.close()


async def test_fast_path_and_hand_off_over_tls(serve: ServeFactory, bundles: dict[str, pathlib.Path],
                                               tmp_path: pathlib.Path, want: np.ndarray) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    served = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, tls_cert=str(cert), tls_key=str(key)))
    tls = ssl.create_default_context(cafile=str(cert))
    reader, writer = await connect(served, tls)
    writer.write(post() + b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n" + post())
    answers = [await read_response(reader) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 200]
    np.testing.assert_array_equal(logits(answers[0][2]), want)
    np.testing.assert_array_equal(logits(answers[2][2]), want)
    front = served.server.front
    assert front is not None and (front.served, front.handed_off) == (1, 1)
    writer.close()


async def test_a_stream_cut_anywhere_is_answered_the_same(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], want: np.ndarray) -> None:
    """Framing: a fast request, a bad one, a fast one, then a route for aiohttp, sent in two pieces
    cut at 40 places (seeded); every cut gets the same four answers in the same order."""
    served = await serve([bundles["mlp"]])
    bad = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]})
    stream = post() + post(bad) + post() + b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n"
    rng = np.random.default_rng(7)
    for cut in sorted(rng.choice(np.arange(1, len(stream)), 40, replace=False)):
        reader, writer = await connect(served)
        writer.write(stream[:cut])
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(stream[cut:])
        answers = [await read_response(reader) for _ in range(4)]
        assert [a[0] for a in answers] == [200, 400, 200, 200], cut
        np.testing.assert_array_equal(logits(answers[0][2]), want)
        np.testing.assert_array_equal(logits(answers[2][2]), want)
        writer.close()
