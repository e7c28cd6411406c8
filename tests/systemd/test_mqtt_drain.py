"""Draining with MQTT configured: the front end unsubscribes first, so the broker stops delivering new
requests to this agent, while the request already in flight still gets its reply."""

from __future__ import annotations

import asyncio
import pathlib

import orjson
import pytest

import bundle
from agent.mqtt import MqttFrontEnd, MqttSettings
from tests.agent.mqtt_broker import DEVICE, PREFIX, REPLIES, Requester, running_broker, serving_dataplane
from tests.systemd.slow_model import slow_model

pytestmark = pytest.mark.timeout(90)

REQUEST = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "data": [0.1] * 16}]})


async def test_drain_unsubscribes_then_answers_what_is_in_flight(
        tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    src = tmp_path / "bundle"
    bundle.build([slow_model(tmp_path / "slow.onnx", iterations=1_500_000)], src,
                 bundle.BuildOptions(name="slow", version="1.0.0"))
    bundle.sign_directory(src, keypair[0])
    dp = await serving_dataplane(src, bundle.anchors([keypair[1]]))
    topic = f"{PREFIX}/models/slow/infer"
    with running_broker(tmp_path / "broker") as broker:
        front = MqttFrontEnd(dp, MqttSettings.from_url(broker.url, device_id=DEVICE, reconnect_min_s=0.1))
        requester = Requester(broker.port).connect()
        try:
            await front.start()
            assert await front.wait_ready(15)
            requester.subscribe(f"{REPLIES}/#")
            await requester.apublish(topic, REQUEST, response_topic=f"{REPLIES}/first")
            for _ in range(500):
                if front.status().in_flight == 1:
                    break
                await asyncio.sleep(0.01)
            assert front.status().in_flight == 1

            dp.begin_drain()  # what SIGTERM does in `outpost serve` and the agent
            stopping = asyncio.create_task(front.stop())
            await asyncio.sleep(0.3)  # the UNSUBSCRIBE reaches the broker
            assert not stopping.done(), "the first request should still be computing"
            await requester.apublish(topic, REQUEST, response_topic=f"{REPLIES}/second")
            await stopping
            replies = await requester.adrain(0.5)
        finally:
            requester.close()
            await dp.close()
    assert [r.topic for r in replies] == [f"{REPLIES}/first"]
    assert "outputs" in orjson.loads(replies[0].payload)
    status = front.status()
    assert status.requests == 1  # the second request never reached the agent (not even to be refused)
