"""Overload, deadlines, disconnects and slow clients against a real server; then a normal request is exact."""

from __future__ import annotations

import asyncio
import io
import pathlib
import re
from typing import Any

import aiohttp
import numpy as np
import orjson

from agent import ModelConfig, ServerConfig
from tests.agent.conftest import Served, ServeFactory, tensor

IMG = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)


def _binary(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(images.shape),
                                       "parameters": {"binary_data_size": images.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    return header + images.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"}


async def _post_cnn(served: Served, images: np.ndarray, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    body, h = _binary(images)
    async with served.session.post(served.url + "/v2/models/cnn/infer", data=io.BytesIO(body),
                                   headers={**h, **(headers or {})}) as r:
        if r.status != 200:
            return r.status, (await r.json(), r.headers.get("Retry-After"))
        n = int(r.headers["Inference-Header-Content-Length"])
        raw = await r.read()
        return 200, np.frombuffer(raw[n:], np.float32).reshape(len(images), 1000)


async def _metric(served: Served, name: str, **labels: str) -> float:
    async with served.session.get(served.url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_overload_sheds_with_503_and_health_still_answers(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], reference: Any) -> None:
    served = await serve([bundles["cnn"], bundles["mlp"]], model_config=ModelConfig(max_queue=2, max_batch_size=4))
    want = reference("cnn", {"image": IMG})["logits"]
    flood = [asyncio.ensure_future(_post_cnn(served, IMG)) for _ in range(16)]
    # while the CNN queue is full: health, metrics and other models still answer
    probes = []
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/v2/models/cnn/ready"):
        async with served.session.get(served.url + path) as r:
            probes.append(r.status)
    assert probes == [200, 200, 200, 200]
    status, _ = await served.infer_json("mlp", [tensor("input", np.zeros((1, 64), np.float32))])
    assert status == 200
    results = await asyncio.gather(*flood)
    shed = [r for r in results if r[0] == 503]
    done = [r for r in results if r[0] == 200]
    assert shed and done, [r[0] for r in results]
    assert len(shed) + len(done) == len(results)
    for _, (doc, retry_after) in shed:
        assert "overloaded" in doc["error"] and "'cnn'" in doc["error"]
        assert retry_after is not None and int(retry_after) >= 1
    for _, out in done:
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    assert await _metric(served, "outpost_request_failures_total", model="cnn", reason="Overloaded") == len(shed)
    status, out = await _post_cnn(served, IMG)
    assert status == 200
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


async def test_deadline_is_a_504_and_the_server_recovers(serve: ServeFactory, bundles: dict[str, pathlib.Path],
                                                         reference: Any) -> None:
    served = await serve([bundles["cnn"]], model_config=ModelConfig(max_batch_size=4))
    status, (doc, _) = await _post_cnn(served, IMG, {"Outpost-Timeout-Ms": "1"})
    assert status == 504 and "deadline" in doc["error"] and "'cnn'" in doc["error"]
    status, out = await _post_cnn(served, IMG)
    assert status == 200
    np.testing.assert_allclose(out, reference("cnn", {"image": IMG})["logits"], rtol=1e-4, atol=1e-4)


async def test_default_deadline_applies_without_header(serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    served = await serve([bundles["cnn"]], model_config=ModelConfig(max_batch_size=4, timeout_ms=1))
    status, (_doc, _) = await _post_cnn(served, IMG)
    assert status == 504


async def test_a_disconnected_client_is_dropped_from_the_queue(
        serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    # one instance: the queue arithmetic below assumes one engine batch computing at a time
    served = await serve([bundles["cnn"]], model_config=ModelConfig(max_batch_size=4, instances=1))
    sm = served.dataplane.get("cnn")
    big = np.concatenate([IMG] * 4)  # 16 images in 4 engine batches: the engine stays busy a while
    first = asyncio.ensure_future(_post_cnn(served, big))
    while sm.batcher.busy_instances == 0:
        await asyncio.sleep(0.001)
    body, headers = _binary(IMG[:1])
    async with aiohttp.ClientSession() as other:
        task = asyncio.ensure_future(other.post(served.url + "/v2/models/cnn/infer", data=body, headers=headers))
        while sm.batcher.queue_depth < 4:  # the 3 remaining parts of `first`, and this one
            await asyncio.sleep(0.001)
        task.cancel()  # the client goes away while queued
    while await _metric(served, "outpost_request_failures_total", model="cnn", reason="Cancelled") < 1:
        await asyncio.sleep(0.01)
    status, _ = await first
    assert status == 200
    assert sm.batcher.queue_depth == 0
    batches = await _metric(served, "outpost_batch_size_count", model="cnn")
    assert batches == 4  # the dropped request never ran


async def test_slow_clients_do_not_block_health(serve: ServeFactory, bundles: dict[str, pathlib.Path],
                                                reference: Any) -> None:
    served = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, body_timeout_s=0.5))
    port = served.server.port
    trickle = []
    for _ in range(100):  # slowloris: headers never finished
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        trickle.append(w)
    # a body that never completes is cut off at the body deadline
    r_body, w_body = await asyncio.open_connection("127.0.0.1", port)
    w_body.write(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"inputs\":")
    await w_body.drain()
    async with served.session.get(served.url + "/v2/health/ready") as r:
        assert r.status == 200
    line = await asyncio.wait_for(r_body.readline(), 10)
    assert re.match(rb"HTTP/1.1 400", line), line
    for w in (*trickle, w_body):
        w.close()
    status, doc = await served.infer_json("mlp", [tensor("input", np.ones((1, 64), np.float32))])
    assert status == 200
    np.testing.assert_array_equal(np.array(doc["outputs"][0]["data"], np.float32),
                                  reference("mlp", {"input": np.ones((1, 64), np.float32)})["logits"].ravel())


async def test_metrics_per_model_and_tail_window(serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    served = await serve([bundles["mlp"]])
    for _ in range(5):
        status, _ = await served.infer_json("mlp", [tensor("input", np.ones((2, 64), np.float32))])
        assert status == 200
    await served.infer_json("mlp", [tensor("input", np.ones((2, 63), np.float32))])
    labels = {"model": "mlp", "version": "1.0.0", "backend": "ort-cpu"}
    assert await _metric(served, "outpost_requests_total", **labels) == 6
    assert await _metric(served, "outpost_request_failures_total", reason="ValidationError", **labels) == 1
    for name in ("outpost_queue_seconds_count", "outpost_compute_seconds_count", "outpost_request_seconds_count"):
        assert await _metric(served, name, **labels) == 5
    assert await _metric(served, "outpost_batch_size_sum", **labels) == 10
    assert await _metric(served, "outpost_in_flight_requests", **labels) == 0
    assert await _metric(served, "outpost_queue_depth", **labels) == 0
    tail = served.dataplane.tail_latency()[("mlp", "1.0.0")]
    assert tail.count == 5 and tail.p50_ms is not None and tail.p99_ms is not None
    assert tail.p50_ms <= tail.p95_ms <= tail.p99_ms  # type: ignore[operator]


async def test_drain_refuses_new_requests_and_finishes_in_flight(
        serve: ServeFactory, bundles: dict[str, pathlib.Path], reference: Any) -> None:
    served = await serve([bundles["cnn"]], model_config=ModelConfig(max_batch_size=4))
    sm = served.dataplane.get("cnn")
    in_flight = asyncio.ensure_future(_post_cnn(served, IMG))
    while sm.batcher.busy_instances == 0:
        await asyncio.sleep(0.001)
    served.dataplane.begin_drain()
    async with served.session.get(served.url + "/v2/health/ready") as r:
        assert r.status == 503
    status, (doc, retry_after) = await _post_cnn(served, IMG[:1])
    assert status == 503 and "shutting down" in doc["error"] and retry_after
    status, out = await in_flight
    assert status == 200
    np.testing.assert_allclose(out, reference("cnn", {"image": IMG})["logits"], rtol=1e-4, atol=1e-4)
    assert await served.dataplane.wait_idle(5)
