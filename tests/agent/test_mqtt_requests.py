"""MQTT inference against a real Mosquitto, with a plain paho client as the requester.

Request/response (MQTT 5 and the 3.1.1 fallback), binary payloads, every
error reply, duplicates, refused reply topics, presence and telemetry, and
HTTP beside MQTT on one data plane.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import orjson
import pytest

from agent.config import ModelConfig, ServerConfig
from agent.dataplane import DataPlane
from agent.http_server import HttpServer
from agent.mqtt import MqttFrontEnd
from tests.agent.mqtt_broker import (
    INFER,
    PREFIX,
    REPLIES,
    MosquittoBroker,
    Requester,
    front_end,
    running_broker,
    serving_dataplane,
)

pytestmark = pytest.mark.timeout(60)

HLEN = "Inference-Header-Content-Length"


@pytest.fixture
def broker(tmp_path: pathlib.Path) -> Iterator[MosquittoBroker]:
    with running_broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture
async def front(dataplane: DataPlane, broker: MosquittoBroker) -> AsyncIterator[MqttFrontEnd]:
    async with front_end(dataplane, broker) as f:
        yield f


@pytest.fixture
def requester(broker: MosquittoBroker) -> Iterator[Requester]:
    r = Requester(broker.port).connect()
    r.subscribe(f"{REPLIES}/#")
    yield r
    r.close()


@pytest.fixture(scope="module")
def reference(model_paths: dict[str, pathlib.Path]) -> Callable[[np.ndarray], np.ndarray]:
    """A bare ONNX Runtime run of the same model: what every answer must equal."""
    session = ort.InferenceSession(str(model_paths["mlp"]), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def request_json(x: np.ndarray, **params: Any) -> bytes:
    doc: dict[str, Any] = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                       "data": x.ravel().tolist()}]}
    if params:
        doc["parameters"] = params
    return orjson.dumps(doc)


def binary_header(x: np.ndarray, **params: Any) -> bytes:
    return orjson.dumps({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        "parameters": params,
    })


def sample(rows: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def served_requests(dp: DataPlane) -> float:
    """Requests the model actually ran (the data plane's own counter)."""
    value = dp.metrics.registry.get_sample_value(
        "outpost_requests_total", {"model": "mlp", "version": "1.0.0", "backend": "ort-cpu"})
    return value or 0.0


def hold_loop_while(action: Callable[[], None], settle_s: float = 0.5) -> None:
    """Run `action` and wait with the event loop blocked, so every message it causes is
    handed to the loop before any is served: a burst that lands at once, deterministically."""
    action()
    time.sleep(settle_s)


# ----------------------------------------------------------------------------- request/response


async def test_mqtt5_request_response_with_correlation_data(front: MqttFrontEnd, requester: Requester,
                                                            reference: Callable[..., np.ndarray]) -> None:
    x = sample()
    corr = b"\x00\x01binary-correlation\xff"
    await requester.apublish(INFER, request_json(x), response_topic=f"{REPLIES}/c1", correlation=corr)
    reply = await requester.aget()
    assert reply.topic == f"{REPLIES}/c1"
    assert reply.correlation == corr
    assert reply.user_properties["status"] == "200"
    doc = orjson.loads(reply.payload)
    assert (doc["model_name"], doc["model_version"]) == ("mlp", "1.0.0")
    out = doc["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [2, 10])
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(2, 10), reference(x), rtol=1e-5, atol=1e-6)

    await requester.apublish(f"{PREFIX}/models/mlp/versions/1.0.0/infer", request_json(x),
                             response_topic=f"{REPLIES}/c2", correlation=b"v")
    versioned = await requester.aget()
    assert versioned.correlation == b"v" and orjson.loads(versioned.payload)["model_version"] == "1.0.0"


async def test_mqtt311_fallback_reply_topic_and_correlation_id_in_the_request(
        front: MqttFrontEnd, broker: MosquittoBroker, reference: Callable[..., np.ndarray]) -> None:
    old = Requester(broker.port, protocol=311).connect()
    try:
        old.subscribe(f"{REPLIES}/#")
        x = sample(1, seed=3)
        await old.apublish(INFER, request_json(x, reply_topic=f"{REPLIES}/plc", correlation_id="job-17"))
        reply = await old.aget()
        assert reply.topic == f"{REPLIES}/plc"
        doc = orjson.loads(reply.payload)
        assert doc["parameters"]["correlation_id"] == "job-17"
        np.testing.assert_allclose(np.array(doc["outputs"][0]["data"], np.float32).reshape(1, 10), reference(x),
                                   rtol=1e-5, atol=1e-6)
        await old.apublish(f"{PREFIX}/models/nope/infer",
                           request_json(x, reply_topic=f"{REPLIES}/plc", correlation_id=18))
        err = orjson.loads((await old.aget()).payload)
        assert err == {"error": "model 'nope' is not served here", "status": 404, "correlation_id": "18"}
    finally:
        old.close()


async def test_binary_payload_mqtt5(front: MqttFrontEnd, requester: Requester,
                                    reference: Callable[..., np.ndarray]) -> None:
    x = sample(4, seed=5)
    header = binary_header(x)
    await requester.apublish(INFER, header + x.tobytes(), response_topic=f"{REPLIES}/bin", correlation=b"b1",
                             user_properties={HLEN: str(len(header))})
    reply = await requester.aget()
    n = int(reply.user_properties[HLEN])
    doc = orjson.loads(reply.payload[:n])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 4 * 10 * 4
    got = np.frombuffer(reply.payload[n:], dtype="<f4").reshape(4, 10)
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-6)


async def test_binary_payload_mqtt311_with_nul_separator(front: MqttFrontEnd, broker: MosquittoBroker,
                                                         reference: Callable[..., np.ndarray]) -> None:
    old = Requester(broker.port, protocol=311).connect()
    try:
        old.subscribe(f"{REPLIES}/#")
        x = sample(3, seed=6)
        header = binary_header(x, reply_topic=f"{REPLIES}/bin311", correlation_id="b2")
        await old.apublish(INFER, header + b"\0" + x.tobytes())
        reply = await old.aget()
        head, _, tail = reply.payload.partition(b"\0")
        assert orjson.loads(head)["parameters"]["correlation_id"] == "b2"
        np.testing.assert_allclose(np.frombuffer(tail, "<f4").reshape(3, 10), reference(x), rtol=1e-5, atol=1e-6)
    finally:
        old.close()


# ----------------------------------------------------------------------------- errors

GOOD = request_json(sample(1))
HUGE_EMPTY_BINARY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 2**62, 2**62],
                                              "parameters": {"binary_data_size": 0}}]})
ERROR_CASES = [
    # id, topic suffix, payload, user properties, status, text in the message
    ("malformed-json", "models/mlp/infer", b"{not json", {}, 400, "malformed JSON"),
    ("not-an-object", "models/mlp/infer", b"[1, 2]", {}, 400, "JSON object"),
    ("no-inputs", "models/mlp/infer", b'{"inputs": []}', {}, 400, "input"),
    ("unknown-model", "models/nope/infer", GOOD, {}, 404, "'nope'"),
    ("unknown-version", "models/mlp/versions/9.9.9/infer", GOOD, {}, 404, "'9.9.9'"),
    ("wrong-shape", "models/mlp/infer",
     orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 63], "data": [0.0] * 63}]}),
     {}, 400, "'input'"),
    ("wrong-dtype", "models/mlp/infer",
     orjson.dumps({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 64], "data": [0] * 64}]}),
     {}, 400, "'input'"),
    ("length-mismatch", "models/mlp/infer",
     orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 10}]}),
     {}, 400, "'input'"),
    ("unknown-input", "models/mlp/infer",
     orjson.dumps({"inputs": [{"name": "other", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}),
     {}, 400, "other"),
    ("non-finite", "models/mlp/infer",
     orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ["NaN"] * 64}]}),
     {}, 400, "'input'"),
    ("huge-empty-json", "models/mlp/infer",
     orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 2**62, 2**62], "data": []}]}),
     {}, 400, "'input': shape [0, 4611686018427387904, 4611686018427387904] is too big"),
    ("huge-empty-binary", "models/mlp/infer", HUGE_EMPTY_BINARY, {HLEN: str(len(HUGE_EMPTY_BINARY))}, 400, "too big"),
    ("mixed-float-bool", "models/mlp/infer",
     orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1.5, True]}]}),
     {}, 400, "element 1 is 'True', not a number"),
    ("bad-header-length", "models/mlp/infer", GOOD, {HLEN: "999999"}, 400, "Inference-Header-Content-Length"),
    ("bad-timeout", "models/mlp/infer", GOOD, {"Outpost-Timeout-Ms": "soon"}, 400, "Outpost-Timeout-Ms"),
    ("deadline", "models/mlp/infer", GOOD, {"Outpost-Timeout-Ms": "0.001"}, 504, "deadline"),
]


@pytest.mark.parametrize(("suffix", "payload", "props", "status", "text"),
                         [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
async def test_error_replies(front: MqttFrontEnd, requester: Requester, reference: Callable[..., np.ndarray],
                             suffix: str, payload: bytes, props: dict[str, str], status: int, text: str) -> None:
    await requester.apublish(f"{PREFIX}/{suffix}", payload, response_topic=f"{REPLIES}/err", correlation=b"e1",
                             user_properties=props)
    reply = await requester.aget()
    doc = orjson.loads(reply.payload)
    assert doc["status"] == status and reply.user_properties["status"] == str(status), doc
    assert text in doc["error"], doc
    assert reply.correlation == b"e1"
    # ... and nothing a client sends stops the front end: the next request is answered exactly.
    x = sample(1, seed=9)
    await requester.apublish(INFER, request_json(x), response_topic=f"{REPLIES}/ok", correlation=b"ok")
    ok = await requester.aget()
    assert ok.user_properties["status"] == "200"
    np.testing.assert_allclose(np.array(orjson.loads(ok.payload)["outputs"][0]["data"], np.float32).reshape(1, 10),
                               reference(x), rtol=1e-5, atol=1e-6)


async def test_payload_over_the_limit_is_413(dataplane: DataPlane, broker: MosquittoBroker,
                                             requester: Requester) -> None:
    async with front_end(dataplane, broker, max_payload_bytes=1024):
        await requester.apublish(INFER, request_json(sample(8)), response_topic=f"{REPLIES}/big", correlation=b"b")
        doc = orjson.loads((await requester.aget()).payload)
        assert doc["status"] == 413 and "1024-byte limit" in doc["error"]


async def test_overload_answers_503_with_retry_after(make_bundle: Callable[..., pathlib.Path], trust: Any,
                                                     broker: MosquittoBroker, requester: Requester) -> None:
    dp = await serving_dataplane(make_bundle("mlp", name="mlp", version="1.0.0"), trust,
                                 ModelConfig(max_queue=1))
    try:
        async with front_end(dp, broker):
            n = 20

            def burst() -> None:
                for i in range(n):
                    requester.publish(INFER, GOOD, response_topic=f"{REPLIES}/load", correlation=str(i).encode())

            hold_loop_while(burst)
            replies = [await requester.aget() for _ in range(n)]
            assert sorted(r.correlation or b"" for r in replies) == sorted(str(i).encode() for i in range(n))
            statuses = [int(r.user_properties["status"]) for r in replies]
            assert set(statuses) <= {200, 503} and statuses.count(503) >= 1 and statuses.count(200) >= 1
            busy = next(orjson.loads(r.payload) for r in replies if r.user_properties["status"] == "503")
            assert "overloaded" in busy["error"] and busy["retry_after_s"] >= 1
            assert await requester.adrain() == []
    finally:
        await dp.close()


async def test_draining_answers_503(dataplane: DataPlane, front: MqttFrontEnd, requester: Requester) -> None:
    dataplane.begin_drain()
    await requester.apublish(INFER, GOOD, response_topic=f"{REPLIES}/drain", correlation=b"d")
    doc = orjson.loads((await requester.aget()).payload)
    assert doc["status"] == 503 and "shutting down" in doc["error"]


async def test_requests_with_nowhere_to_reply_are_dropped_and_counted(
        front: MqttFrontEnd, requester: Requester, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "agent.mqtt")
    await requester.apublish(INFER, GOOD)  # no Response Topic, no parameters.reply_topic
    await requester.apublish(INFER, b"\x00\xff garbage")
    await requester.apublish(INFER, GOOD, response_topic=f"{REPLIES}/after", correlation=b"a")
    reply = await requester.aget()
    assert reply.correlation == b"a" and reply.user_properties["status"] == "200"
    assert front.status().unanswerable == 2
    assert any("nowhere to reply" in r.getMessage() or "no Response Topic" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- duplicates


async def test_qos1_duplicates_run_once_and_are_answered_once(
        dataplane: DataPlane, front: MqttFrontEnd, requester: Requester) -> None:
    def twice() -> None:  # the redelivery lands while the first copy is still in flight
        for _ in range(2):
            requester.publish(INFER, GOOD, response_topic=f"{REPLIES}/dup", correlation=b"same")

    hold_loop_while(twice)
    first = await requester.aget()
    assert first.correlation == b"same"
    assert await requester.adrain(1.0) == []
    # ... and again after it was answered.
    await requester.apublish(INFER, GOOD, response_topic=f"{REPLIES}/dup", correlation=b"same")
    assert await requester.adrain(1.0) == []
    assert served_requests(dataplane) == 1
    assert front.status().duplicates == 2
    # The same correlation id from another requester (another reply topic) is another request.
    await requester.apublish(INFER, GOOD, response_topic=f"{REPLIES}/other", correlation=b"same")
    assert (await requester.aget()).topic == f"{REPLIES}/other"
    assert served_requests(dataplane) == 2


async def test_mqtt311_duplicates_by_correlation_id(dataplane: DataPlane, front: MqttFrontEnd,
                                                    broker: MosquittoBroker) -> None:
    old = Requester(broker.port, protocol=311).connect()
    try:
        old.subscribe(f"{REPLIES}/#")
        body = request_json(sample(1), reply_topic=f"{REPLIES}/old", correlation_id="x-1")
        for _ in range(3):
            await old.apublish(INFER, body)
        assert orjson.loads((await old.aget()).payload)["parameters"]["correlation_id"] == "x-1"
        assert await old.adrain(1.0) == []
        assert served_requests(dataplane) == 1
    finally:
        old.close()


# ----------------------------------------------------------------------------- refused reply topics


async def test_response_topic_outside_the_allowed_prefixes_is_refused(
        dataplane: DataPlane, front: MqttFrontEnd, broker: MosquittoBroker, requester: Requester,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "agent.mqtt")
    spy = Requester(broker.port).connect()
    try:
        spy.subscribe("#")
        hostile = ["outpost/dev2/replies/x", "factory/plc/commands", INFER, f"{PREFIX}/status"]
        for i, topic in enumerate(hostile):
            await requester.apublish(INFER, GOOD, response_topic=topic, correlation=str(i).encode())
        await requester.apublish(INFER, request_json(sample(1), reply_topic="factory/plc/commands",
                                                     correlation_id="j"))
        seen = await spy.adrain(1.5)
        # The spy sees the six requests themselves and the retained status, nothing the agent published
        # (but for the broker round-trip probe's own topic, which it times at connect).
        assert [m.topic for m in seen if not m.retain and front.probe.topic not in m.topic] == [INFER] * 5
        assert front.status().refused_reply_topics == 5
        assert served_requests(dataplane) == 0
        assert await requester.adrain(0.2) == []
        assert any("outside the allowed reply prefixes" in r.getMessage() for r in caplog.records)
    finally:
        spy.close()


async def test_configured_reply_prefixes(dataplane: DataPlane, broker: MosquittoBroker,
                                         requester: Requester) -> None:
    requester.subscribe("gateway/+/answers/#")
    async with front_end(dataplane, broker, reply_prefixes=("gateway/+/answers/#",)):
        await requester.apublish(INFER, GOOD, response_topic="gateway/line3/answers/1", correlation=b"g")
        assert (await requester.aget()).topic == "gateway/line3/answers/1"
        await requester.apublish(INFER, GOOD, response_topic=f"{REPLIES}/x", correlation=b"no")
        assert await requester.adrain(1.0) == []


# ----------------------------------------------------------------------------- presence, telemetry, HTTP


async def test_presence_online_last_will_and_offline(dataplane: DataPlane, broker: MosquittoBroker) -> None:
    watcher = Requester(broker.port).connect()
    try:
        async with front_end(dataplane, broker) as front:
            watcher.subscribe(f"{PREFIX}/status")
            online = await watcher.aget()
            doc = orjson.loads(online.payload)
            assert online.retain and doc["state"] == "online" and doc["agent_version"]
            assert [(m["name"], m["version"]) for m in doc["models"]] == [("mlp", "1.0.0")]
            # The link dies without a DISCONNECT (a pulled cable): the broker publishes the Last Will,
            # then the agent reconnects and says it is online again.
            sock = front.connection.client.socket()
            assert sock is not None
            sock.shutdown(2)
            states = [orjson.loads((await watcher.aget()).payload)["state"] for _ in range(2)]
            assert states == ["offline", "online"]
        # a clean stop's last word is "offline"; on a loaded machine the reconnect above may have said
        # "online" once more (seen with two busy loops beside the suite), never anything else
        after = [orjson.loads((await watcher.aget()).payload)["state"]]
        while after[-1] == "online" and len(after) < 4:
            after.append(orjson.loads((await watcher.aget()).payload)["state"])
        assert after[-1] == "offline" and set(after[:-1]) <= {"online"}, after
        late = Requester(broker.port).connect()  # retained: a newcomer learns it at once
        try:
            late.subscribe(f"{PREFIX}/status")
            got = await late.aget()
            assert got.retain and orjson.loads(got.payload)["state"] == "offline"
        finally:
            late.close()
    finally:
        watcher.close()


async def test_periodic_telemetry(dataplane: DataPlane, broker: MosquittoBroker, requester: Requester) -> None:
    requester.subscribe(f"{PREFIX}/telemetry")
    async with front_end(dataplane, broker, telemetry_interval_s=0.1):
        doc = orjson.loads((await requester.aget()).payload)
        assert doc["device_id"] == "dev1" and doc["ready"] is True
        assert doc["mqtt"]["connection"]["state"] == "connected"


async def test_http_and_mqtt_share_one_data_plane(dataplane: DataPlane, front: MqttFrontEnd,
                                                  requester: Requester,
                                                  reference: Callable[..., np.ndarray]) -> None:
    server = HttpServer(dataplane, ServerConfig(port=0))
    await server.start()
    try:
        xs = [sample(1, seed=i) for i in range(16)]

        async def over_http(session: aiohttp.ClientSession, x: np.ndarray) -> np.ndarray:
            async with session.post(f"{server.url}/v2/models/mlp/infer", data=request_json(x)) as resp:
                assert resp.status == 200
                return np.array((await resp.json())["outputs"][0]["data"], np.float32).reshape(1, 10)

        async def over_mqtt() -> None:
            for i, x in enumerate(xs):
                await requester.apublish(INFER, request_json(x), response_topic=f"{REPLIES}/mix",
                                         correlation=str(i).encode(), qos=0)

        async with aiohttp.ClientSession() as session:
            http_out, _ = await asyncio.gather(asyncio.gather(*(over_http(session, x) for x in xs)), over_mqtt())
        for x, y in zip(xs, http_out, strict=True):
            np.testing.assert_allclose(y, reference(x), rtol=1e-5, atol=1e-6)
        for _ in xs:
            r = await requester.aget()
            y = np.array(orjson.loads(r.payload)["outputs"][0]["data"], np.float32).reshape(1, 10)
            np.testing.assert_allclose(y, reference(xs[int(r.correlation or b"")]), rtol=1e-5, atol=1e-6)
        assert served_requests(dataplane) == 2 * len(xs)
        # The MQTT link shows on the same /metrics endpoint once registered (outpost serve does it).
    finally:
        await server.stop()
