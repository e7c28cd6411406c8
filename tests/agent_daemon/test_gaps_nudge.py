"""With MQTT configured, the fleet's nudge wakes the agent's sync at once; the nudge itself is never trusted.

Real Mosquitto, a real fleet started with ``--nudge-mqtt`` running a real
rollout, a real agent process. The proxy between agent and fleet holds every
long-poll for a minute (as a fleet instance that is not told of the change
would), so the new version can only arrive this soon because the nudge cut
the held poll short and the agent asked again at once. A forged nudge (a
huge serial, garbage) makes the agent poll at most; what it accepts is still
the signed, verified document.
"""

from __future__ import annotations

import json
import pathlib
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.agent.mqtt_broker import MosquittoBroker
from tests.agent_daemon.conftest import Version
from tests.agent_daemon.gaps_proxy import FleetProxy, ProxiedFleet
from tests.agent_daemon.harness import Agent, Fleet, running

HOLD_S = 60.0


def _publish(url_port: int, topic: str, payloads: list[bytes]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"forger-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", url_port)
    client.loop_start()
    try:
        for p in payloads:
            client.publish(topic, p, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def test_nudge_delivers_a_rollout_long_before_the_long_poll(tmp_path: pathlib.Path, versions: dict[str, Version],
                                                           keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    broker = MosquittoBroker(tmp_path / "mqtt")
    broker.start()
    fleet = Fleet(tmp_path / "fleet", keypair[1], extra=["--nudge-mqtt", broker.url, "--rollout-interval", "0.2s"])
    try:
        fleet.start()
        for v in ("v1", "v2"):
            fleet.push(versions[v].archive)
        with FleetProxy(fleet.url, hold_long_polls_s=HOLD_S) as proxy:
            agent = Agent(tmp_path / "device", ProxiedFleet(proxy, fleet), keypair[1],  # type: ignore[arg-type]
                          sync__long_poll_s=HOLD_S, mqtt__url=broker.url)
            with running(fleet, agent):
                fleet.assign(agent.device_id, versions["v1"].ref)
                agent.start()
                agent.wait_serving("demo", "1.0.0")
                agent.wait_for(lambda st: proxy.held >= 1, 30, "the agent waiting in a held long-poll")
                serial = agent.status()["assignment"]["serial"]
                topic = f"outpost/devices/{agent.device_id}/nudge"

                # forged nudges: garbage is ignored; a huge serial only makes the agent ask the fleet
                polls = len(proxy.requests("assignment"))
                _publish(broker.port, topic, [b"not json", b'{"serial": "9"}', json.dumps({"serial": 10**9}).encode()])
                agent.wait_for(lambda st: len(proxy.requests("assignment")) > polls, 20, "a poll after the nudge")
                time.sleep(1.0)
                st = agent.status()
                assert st["assignment"]["serial"] == serial  # the nudge's serial was never taken
                assert st["models"]["demo"]["version"] == "1.0.0"
                assert len(proxy.requests("assignment")) == polls + 1  # one poll for three messages

                # a real rollout: the fleet assigns v2 and nudges; the held long-poll would answer in a minute
                agent.wait_for(lambda st: proxy.held >= 2, 30, "the agent back in a held long-poll")
                started = time.monotonic()
                fleet.api("POST", "/api/v1/rollouts", {"bundle": versions["v2"].ref, "stages": [{"percent": 100}],
                                                       "selector": {"devices": [agent.device_id]}})
                agent.wait_serving("demo", "2.0.0", timeout_s=HOLD_S / 2)
                took = time.monotonic() - started
                assert took < HOLD_S / 3, took
                st = agent.status()
                assert st["assignment"]["serial"] > serial
    finally:
        fleet.stop()
        broker.stop()


def test_only_a_serial_is_read_from_a_nudge() -> None:
    from agent.mqtt.nudge import parse_nudge

    assert parse_nudge(b'{"serial": 7}') == 7
    for junk in (b"", b"7", b"[]", b'{"serial": -1}', b'{"serial": 7.0}', b'{"serial": true}', b"\xff",
                 b'{"serial": 1, "pad": "' + b"x" * 300 + b'"}'):
        assert parse_nudge(junk) is None, junk
