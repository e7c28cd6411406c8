"""A broker with a password file and an ACL: the agent works with its credentials; a wrong
password is a clear error in the log, the status and `/metrics`, and the agent keeps retrying."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from agent.dataplane import DataPlane
from agent.mqtt.metrics import MqttCollector
from tests.agent.mqtt_broker import (
    DEVICE,
    GOOD,
    INFER,
    PREFIX,
    REPLIES,
    MosquittoBroker,
    Requester,
    front_end,
)

pytestmark = pytest.mark.timeout(90)

USERS = {"agent": "agent-pw", "client": "client-pw"}
# Each party may touch only its side of the device's topic tree.
ACL = f"""
user agent
topic read {PREFIX}/models/+/infer
topic read {PREFIX}/models/+/versions/+/infer
topic write {PREFIX}/replies/#
topic readwrite {PREFIX}/status
topic write {PREFIX}/telemetry

user client
topic write {PREFIX}/models/#
topic read {PREFIX}/replies/#
topic read {PREFIX}/status
"""
REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def broker(tmp_path: pathlib.Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker", users=USERS, acl=ACL)
    b.start()
    yield b
    b.stop()


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_agent_works_with_its_credentials(dataplane: DataPlane, broker: MosquittoBroker) -> None:
    client = Requester(broker.port, username="client", password="client-pw").connect()
    try:
        client.subscribe(f"{REPLIES}/#")
        async with front_end(dataplane, broker, username="agent", password="agent-pw") as front:
            assert front.status().connection.state == "connected"
            await client.apublish(INFER, GOOD, response_topic=f"{REPLIES}/a", correlation=b"1")
            reply = await client.aget()
            assert reply.user_properties["status"] == "200" and reply.correlation == b"1"
    finally:
        client.close()


async def test_wrong_password_is_reported_once_and_retried(dataplane: DataPlane, broker: MosquittoBroker,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agent.mqtt")
    async with front_end(dataplane, broker, ready=False, username="agent", password="wrong",
                         reconnect_min_s=0.05, reconnect_max_s=0.2) as front:
        collector = MqttCollector(front.status)
        dataplane.metrics.registry.register(collector)
        try:
            await wait_for(lambda: front.status().connection.connect_failures >= 4, 30, "repeated attempts")
            status = front.status().connection
            assert status.state == "auth_failed"
            assert status.last_error is not None
            assert "'agent'" in status.last_error
            assert "Bad user name or password" in status.last_error or "Not authorized" in status.last_error
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1, [r.getMessage() for r in errors]  # on the change, not per retry
            assert errors[0].getMessage() == status.last_error
            text = dataplane.metrics.exposition()[0].decode()
            assert 'outpost_mqtt_state{state="auth_failed"} 1.0' in text
            assert "outpost_mqtt_connected 0.0" in text

            # Still retrying: once the broker accepts the password, the agent is in.
            broker.set_users({**USERS, "agent": "wrong"})
            assert await front.wait_ready(30)
            assert front.status().connection.state == "connected"
            assert "outpost_mqtt_connected 1.0" in dataplane.metrics.exposition()[0].decode()
        finally:
            dataplane.metrics.registry.unregister(collector)


def test_outpost_serve_shows_the_mqtt_state(make_bundle: Callable[..., pathlib.Path],
                                            keypair: tuple[pathlib.Path, pathlib.Path],
                                            broker: MosquittoBroker) -> None:
    """`outpost serve --mqtt`: a status line per state change naming the cause, then serving."""
    bundle_dir = make_bundle("mlp", name="mlp", version="1.0.0")
    env = {**os.environ, "OUTPOST_MQTT_PASSWORD": "wrong"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", str(bundle_dir), "--trust", str(keypair[1]), "--port", "0",
         "--mqtt", broker.url, "--mqtt-username", "agent", "--device-id", DEVICE],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read_until(text: str) -> None:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} in {lines}")

    client = Requester(broker.port, username="client", password="client-pw").connect()
    try:
        read_until("auth_failed")
        assert "'agent'" in lines[-1] and ("Bad user name or password" in lines[-1] or "Not authorized" in lines[-1])
        assert any("ready on http://127.0.0.1:" in line for line in lines), lines  # HTTP serves regardless
        broker.set_users({**USERS, "agent": "wrong"})  # the operator fixes the broker side: it gets in
        read_until(": connected")
        read_until("MQTT requests on")
        client.subscribe(f"{REPLIES}/#")
        client.publish(INFER, GOOD, response_topic=f"{REPLIES}/cli", correlation=b"cli")
        reply = client.get(30)
        assert reply.correlation == b"cli" and reply.user_properties["status"] == "200"
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
