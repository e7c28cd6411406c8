"""A real Mosquitto broker for the MQTT tests, on a free loopback port.

Each broker gets its own generated config, password file and ACL in a temp
directory, so the tests never depend on (or disturb) a system broker, and can
kill and restart it on the same port to play a broker crash. `requester`
gives the second, plain paho client that plays the sensor or PLC gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pathlib
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"




def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """One broker process; `start` after `kill` brings it back on the same port."""

    def __init__(self, workdir: pathlib.Path, *, users: Mapping[str, str] | None = None,
                 acl: str | None = None, port: int | None = None, extra: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.users = dict(users or {})
        self.acl = acl
        self.extra = tuple(extra)
        self.log_path = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence false",
            # When run as root, mosquitto 2 drops to user "mosquitto", which cannot read
            # files in a pytest temp dir; the test broker stays who started it.
            "user root" if os.getuid() == 0 else "",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            *self.extra,
        ]
        if self.users:
            pw = self.workdir / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True,
                               capture_output=True, timeout=30)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl = self.workdir / "acl"
            acl.write_text(self.acl)
            lines.append(f"acl_file {acl}")
        (self.workdir / "mosquitto.conf").write_text("\n".join(line for line in lines if line) + "\n")

    def start(self, timeout_s: float = 15.0) -> None:
        assert self._proc is None, "broker already running"
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen([MOSQUITTO, "-c", str(self.workdir / "mosquitto.conf")],
                                      stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}: {self.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log_text()}")

    def set_users(self, users: Mapping[str, str]) -> None:
        """Rewrite the password file and make the running broker reload it (SIGHUP)."""
        self.users = dict(users)
        self._write_config()
        if self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, like a crash or a pulled cable."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: int) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def running_broker(workdir: pathlib.Path, **kwargs: Any) -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(workdir, **kwargs)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    correlation: bytes | None
    user_properties: dict[str, str]
    retain: bool


class Requester:
    """A plain paho client in its own thread, as a sensor or gateway would be."""

    def __init__(self, port: int, *, protocol: int = 5, username: str | None = None,
                 password: str | None = None,
                 tls: tuple[pathlib.Path, pathlib.Path, pathlib.Path] | None = None) -> None:
        version = MQTTProtocolVersion.MQTTv5 if protocol == 5 else MQTTProtocolVersion.MQTTv311
        self.protocol = protocol
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"req-{uuid.uuid4().hex[:8]}",
                                  protocol=version)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:  # (CA, certificate, key)
            self.client.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
        self.messages: queue.Queue[Received] = queue.Queue()
        self._topics: dict[str, int] = {}
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(0.1, 1)  # type: ignore[arg-type]
        self.port = port

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                    props: Properties | None) -> None:
        if not rc.is_failure:
            for topic, qos in self._topics.items():  # a restarted broker forgot them
                client.subscribe(topic, qos)
            self._connected.set()

    def _on_subscribe(self, *args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        users = dict(getattr(props, "UserProperty", []) or []) if props is not None else {}
        self.messages.put(Received(msg.topic, bytes(msg.payload), corr, users, bool(msg.retain)))

    def wait_reconnected(self, timeout_s: float = 20.0) -> None:
        """After a broker restart: connected again, and the subscriptions acknowledged."""
        deadline = time.monotonic() + timeout_s
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise TimeoutError("requester did not reconnect")
            time.sleep(0.05)
        for topic, qos in list(self._topics.items()):
            self.subscribe(topic, qos)

    def connect(self, timeout_s: float = 10.0) -> Requester:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout_s):
            raise TimeoutError("requester could not connect")
        return self

    def subscribe(self, topic: str, qos: int = 1, timeout_s: float = 10.0) -> None:
        self._subscribed.clear()
        self._topics[topic] = qos
        self.client.subscribe(topic, qos)
        if not self._subscribed.wait(timeout_s):
            raise TimeoutError(f"subscription to {topic} not acknowledged")

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, response_topic: str | None = None,
                correlation: bytes | None = None, user_properties: Mapping[str, str] | None = None,
                retain: bool = False, wait: bool = True) -> None:
        props = None
        if self.protocol == 5 and (response_topic or correlation or user_properties):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
            if user_properties:
                props.UserProperty = list(user_properties.items())
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if wait:
            info.wait_for_publish(10)

    def get(self, timeout_s: float = 10.0) -> Received:
        return self.messages.get(timeout=timeout_s)

    def drain(self, wait_s: float = 0.3) -> list[Received]:
        """Everything that arrives within `wait_s` more seconds (to prove nothing else came)."""
        out: list[Received] = []
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                return out

    async def aget(self, timeout_s: float = 10.0) -> Received:
        """`get` off the event loop, so that an in-process agent keeps running meanwhile."""
        return await asyncio.to_thread(self.get, timeout_s)

    async def adrain(self, wait_s: float = 0.3) -> list[Received]:
        return await asyncio.to_thread(self.drain, wait_s)

    async def apublish(self, topic: str, payload: bytes | str, **kwargs: Any) -> None:
        await asyncio.to_thread(functools.partial(self.publish, topic, payload, **kwargs))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        self.client.reinitialise()  # closes paho's wake-up socket pair now, not at garbage collection


# ----------------------------------------------------------------------------- the agent side

DEVICE = "dev1"
PREFIX = f"outpost/{DEVICE}"
REPLIES = f"{PREFIX}/replies"
#: the MLP's request topic and a valid request for it, shared by the MQTT test modules
INFER = f"{PREFIX}/models/mlp/infer"
GOOD = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]})


async def serving_dataplane(bundle_dir: pathlib.Path, trust: Any, config: Any = None) -> Any:
    """A real DataPlane serving a verified bundle (the one HTTP would use)."""
    import bundle as bundle_pkg
    from agent.dataplane import DataPlane

    dp = DataPlane()
    vb = bundle_pkg.verify(bundle_dir, trust)
    await asyncio.to_thread(dp.load_bundle, vb, config)
    return dp


@contextlib.asynccontextmanager
async def front_end(dataplane: Any, broker: MosquittoBroker, *, ready: bool = True,
                    **options: Any) -> Any:
    """The agent's MQTT front end on `broker`, fast reconnects for tests; stopped on exit."""
    from agent.mqtt import MqttFrontEnd, MqttSettings

    opts: dict[str, Any] = {"device_id": DEVICE, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0}
    opts.update(options)
    front = MqttFrontEnd(dataplane, MqttSettings.from_url(broker.url, **opts))
    await front.start()
    try:
        if ready:
            assert await front.wait_ready(15), front.status()
        yield front
    finally:
        await front.stop()
