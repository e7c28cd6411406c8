"""The broker round-trip probe against real Mosquitto configs: as installed (Nagle on) and tuned.

Mosquitto's default keeps Nagle's algorithm on its sockets, and a QoS 1
request/reply then waits for a delayed ACK (about 40 ms); with
`set_tcp_nodelay true` the same round trip takes well under a millisecond on
loopback. The agent must see the first, warn once naming the setting, and
stay quiet about the second.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
from collections.abc import Callable

import pytest

from agent.dataplane import DataPlane
from agent.mqtt.metrics import MqttCollector
from agent.mqtt.probe import SLOW_ROUND_TRIP_MS
from tests.agent.mqtt_broker import GOOD, INFER, REPLIES, MosquittoBroker, Requester, front_end, running_broker

pytestmark = pytest.mark.timeout(90)


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


def warnings_naming_the_fix(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "set_tcp_nodelay true" in r.getMessage()]


def gauge(dataplane: DataPlane) -> float | None:
    body, _ = dataplane.metrics.exposition()
    for line in body.decode().splitlines():
        if line.startswith("outpost_mqtt_broker_round_trip_seconds "):
            return float(line.split()[1])
    return None


async def test_default_mosquitto_is_measured_slow_and_named_once(dataplane: DataPlane, tmp_path: pathlib.Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agent.mqtt")
    broker = MosquittoBroker(tmp_path / "default")  # no set_tcp_nodelay: Mosquitto as installed
    broker.start()
    try:
        async with front_end(dataplane, broker, reconnect_max_s=0.5) as front:
            collector = MqttCollector(front.status)
            dataplane.metrics.registry.register(collector)
            await wait_for(lambda: front.probe.last is not None, 30, "the first round-trip measurement")
            first = front.probe.last
            assert first is not None
            assert first.median_ms > SLOW_ROUND_TRIP_MS, first  # Nagle against the delayed ACK: ~40 ms
            assert front.status().broker_round_trip_ms == pytest.approx(first.median_ms, abs=1e-3)
            assert front.status().as_dict()["broker_round_trip_ms"] > SLOW_ROUND_TRIP_MS  # telemetry's health doc
            assert gauge(dataplane) == pytest.approx(first.median_ms / 1000, rel=1e-3)
            [warning] = warnings_naming_the_fix(caplog)
            assert "mosquitto.conf" in warning.getMessage() and f"{first.median_ms:.1f} ms" in warning.getMessage()

            # a broker restart measures again, and does not warn again
            broker.kill()
            broker.start()
            await wait_for(lambda: front.probe.last is not first, 30, "a measurement after the reconnect")
            assert len(warnings_naming_the_fix(caplog)) == 1
            # and requests are served as before (the probe left no subscription behind that answers them)
            requester = Requester(broker.port).connect()
            try:
                requester.subscribe(f"{REPLIES}/#")
                await requester.apublish(INFER, GOOD, response_topic=f"{REPLIES}/x", correlation=b"c1")
                reply = await requester.aget()
                assert reply.user_properties.get("status") == "200" and reply.correlation == b"c1"
            finally:
                requester.close()
            dataplane.metrics.registry.unregister(collector)
    finally:
        broker.stop()


async def test_mosquitto_with_tcp_nodelay_is_fast_and_quiet(dataplane: DataPlane, tmp_path: pathlib.Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agent.mqtt")
    with running_broker(tmp_path / "tuned", extra=["set_tcp_nodelay true"]) as broker:
        async with front_end(dataplane, broker) as front:
            await wait_for(lambda: front.probe.last is not None, 30, "the round-trip measurement")
            rtt = front.probe.last
            assert rtt is not None and rtt.median_ms < SLOW_ROUND_TRIP_MS, rtt
            assert len(rtt.samples_ms) == front.probe.samples
            assert front.status().broker_round_trip_ms == pytest.approx(rtt.median_ms, abs=1e-3)
    assert warnings_naming_the_fix(caplog) == []
    assert any("round trip" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


async def test_an_acl_without_the_probe_topics_leaves_the_figure_unknown_and_serving_intact(
        dataplane: DataPlane, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "agent.mqtt")
    prefix = "outpost/dev1"
    acl = (f"user agent\ntopic read {prefix}/models/+/infer\ntopic write {prefix}/replies/#\n"
           f"topic readwrite {prefix}/status\n\nuser client\ntopic write {prefix}/models/#\n"
           f"topic read {prefix}/replies/#\n")
    users = {"agent": "agent-pw", "client": "client-pw"}
    with running_broker(tmp_path / "acl", users=users, acl=acl) as broker:
        async with front_end(dataplane, broker, username="agent", password="agent-pw") as front:
            collector = MqttCollector(front.status)
            dataplane.metrics.registry.register(collector)
            await wait_for(lambda: any("not measured" in r.getMessage() for r in caplog.records), 30,
                           "the probe to give up")
            assert front.status().broker_round_trip_ms is None
            text = dataplane.metrics.exposition()[0].decode()
            assert "outpost_mqtt_connected 1.0" in text and gauge(dataplane) is None  # no figure, not a zero
            dataplane.metrics.registry.unregister(collector)
            assert front.status().connection.state == "connected"  # the probe's refusal is not the agent's
            requester = Requester(broker.port, username="client", password="client-pw").connect()
            try:
                requester.subscribe(f"{REPLIES}/#")
                await requester.apublish(INFER, GOOD, response_topic=f"{REPLIES}/x", correlation=b"c2")
                assert (await requester.aget()).user_properties.get("status") == "200"
            finally:
                requester.close()
    assert warnings_naming_the_fix(caplog) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "probe" in r.getMessage()]
