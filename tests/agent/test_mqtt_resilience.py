"""Broker crashes and outages (THREATS 24, 26): reconnect with backoff, resubscribe, answer
once, bounded memory while the broker is away, HTTP unaffected throughout."""

from __future__ import annotations

import asyncio
import collections
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest

from agent.config import ServerConfig
from agent.dataplane import DataPlane
from agent.http_server import HttpServer
from agent.mqtt import MqttFrontEnd
from tests.agent.mqtt_broker import (
    GOOD,
    INFER,
    REPLIES,
    MosquittoBroker,
    Received,
    Requester,
    front_end,
)

pytestmark = pytest.mark.timeout(90)

RECONNECT_MAX_S = 1.0


@pytest.fixture
def broker(tmp_path: pathlib.Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
async def http(dataplane: DataPlane) -> AsyncIterator[HttpServer]:
    server = HttpServer(dataplane, ServerConfig(port=0))
    await server.start()
    yield server
    await server.stop()


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `cond` (generously); returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def http_ok(server: HttpServer) -> bool:
    async with aiohttp.ClientSession() as s, s.post(f"{server.url}/v2/models/mlp/infer", data=GOOD) as r:
        return r.status == 200


async def ask(requester: Requester, tag: str, n: int, wait: bool = True) -> None:
    for i in range(n):
        await requester.apublish(INFER, GOOD, response_topic=f"{REPLIES}/s", correlation=f"{tag}{i}".encode(),
                                 wait=wait)


async def test_broker_killed_and_restarted_mid_stream(dataplane: DataPlane, broker: MosquittoBroker,
                                                      http: HttpServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agent.mqtt")
    requester = Requester(broker.port).connect()
    requester.subscribe(f"{REPLIES}/#")
    got: list[Received] = []
    try:
        async with front_end(dataplane, broker, reconnect_min_s=0.1, reconnect_max_s=RECONNECT_MAX_S,
                             outbox_max_messages=5, telemetry_interval_s=0.02) as front:
            await ask(requester, "a", 10)
            got += [await requester.aget() for _ in range(10)]

            # Mid-stream: a burst is on its way (not yet acknowledged) when the broker dies.
            await ask(requester, "b", 30, wait=False)
            broker.kill()
            await wait_for(lambda: front.status().connection.state == "disconnected", 20, "the agent to notice")

            # While the broker is away: HTTP serves, and the outbox (telemetry at 50/s here) stays capped.
            assert await http_ok(http)
            await wait_for(lambda: front.status().connection.dropped >= 10, 20, "the outbox to overflow")
            status = front.status().connection
            assert status.outbox <= 5
            assert status.connect_failures >= 2  # it kept retrying...
            lost = [r for r in caplog.records if "lost the MQTT broker" in r.getMessage()]
            unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(lost) == 1 and len(unreachable) == 1  # ...and said so once, not per retry

            broker.start()
            took = await wait_for(lambda: front.status().connection.connects >= 2, 20, "the agent to reconnect")
            assert took < RECONNECT_MAX_S + 10  # within the backoff limit (+ generous slack)
            assert await front.wait_ready(20)  # subscriptions restored by the agent itself
            assert any("reconnected" in r.getMessage() for r in caplog.records)
            await asyncio.to_thread(requester.wait_reconnected)

            # The agent answers again, on subscriptions it restored itself.
            await ask(requester, "c", 10)
            while True:
                more = await requester.adrain(1.5)
                got += more
                if not more:
                    break
            by_id = collections.Counter((r.correlation or b"").decode() for r in got if r.topic.startswith(REPLIES))
            assert all(by_id[f"a{i}"] == 1 for i in range(10))
            assert all(by_id[f"c{i}"] == 1 for i in range(10))
            assert max(by_id.values()) == 1, [k for k, v in by_id.items() if v > 1]  # nothing answered twice
            assert await http_ok(http)
    finally:
        requester.close()


async def test_agent_starts_before_the_broker(dataplane: DataPlane, tmp_path: pathlib.Path,
                                              http: HttpServer) -> None:
    broker = MosquittoBroker(tmp_path / "late")
    async with front_end(dataplane, broker, ready=False, reconnect_min_s=0.1,
                         reconnect_max_s=RECONNECT_MAX_S) as front:
        await wait_for(lambda: front.status().connection.connect_failures >= 2, 20, "failed attempts")
        assert front.status().connection.state == "disconnected"
        assert await http_ok(http)  # serving does not wait for the broker
        broker.start()
        try:
            assert await front.wait_ready(20)
            requester = Requester(broker.port).connect()
            try:
                requester.subscribe(f"{REPLIES}/#")
                await ask(requester, "x", 1)
                assert (await requester.aget()).user_properties["status"] == "200"
            finally:
                requester.close()
        finally:
            broker.stop()


async def test_stop_is_prompt_while_the_broker_is_away(dataplane: DataPlane, tmp_path: pathlib.Path) -> None:
    broker = MosquittoBroker(tmp_path / "never")  # never started
    t0 = time.monotonic()
    front: MqttFrontEnd
    async with front_end(dataplane, broker, ready=False, reconnect_min_s=0.1) as front:
        await wait_for(lambda: front.status().connection.connect_failures >= 1, 20, "a failed attempt")
    assert front.status().connection.state == "stopped"
    assert time.monotonic() - t0 < 15
