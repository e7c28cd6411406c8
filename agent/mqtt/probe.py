"""Time a request/reply round trip through the broker at each connect, and say when the broker is slow.

Mosquitto keeps Nagle's algorithm on its client sockets unless its config
says `set_tcp_nodelay true`. A requester then gets the broker's PUBACK for
its request and, a moment later, the reply: the reply is a small write behind
an unacknowledged one, so the broker's kernel holds it until the requester's
delayed ACK, about 40 ms, on every request. That default is what most devices
run, and the agent cannot change it; it can measure it and say so.

How: after each connect, a short-lived second connection (same broker,
credentials and TLS; client id `<client id>-probe`) plays the sensor. It
publishes small QoS 1 probes to the agent's own `PREFIX/status/probe`; the
agent's connection echoes each to `PREFIX/status/probe/echo` (only while a
probe runs, and only probe-sized payloads), exactly the path of an MQTT
request and its reply. The first probes warm the sockets up (a fresh TCP
connection ACKs at once for a while); the median of the rest is the round
trip, shown in the MQTT status (telemetry, `outpost serve` output) and as the
gauge `outpost_mqtt_broker_round_trip_seconds`. Above `slow_ms` it warns once,
naming the setting. Brokers whose ACL does not let the agent's user read and
write `PREFIX/status/probe/#` get no figure (logged once), and nothing else
changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass

from runtime.timeouts import timeout

from .connection import CONNECTED, SUBSCRIBE_REFUSED, MqttConnection
from .outbox import Outgoing
from .settings import MqttSettings

log = logging.getLogger("agent.mqtt")

#: "a few milliseconds": a loopback or LAN broker with TCP_NODELAY answers in well under this
SLOW_ROUND_TRIP_MS = 5.0
BROKER_FIX = "set_tcp_nodelay true"
_NONCE_BYTES = 8


@dataclass(frozen=True)
class RoundTrip:
    median_ms: float
    samples_ms: tuple[float, ...]
    at_unix: float


def _resolve(fut: asyncio.Future[float], value: float) -> None:
    if not fut.done():  # timed out meanwhile
        fut.set_result(value)


class BrokerProbe:
    def __init__(self, settings: MqttSettings, agent: MqttConnection, *, warmup: int = 2, samples: int = 5,
                 timeout_s: float = 2.0, slow_ms: float = SLOW_ROUND_TRIP_MS) -> None:
        self.settings = settings
        self.agent = agent
        self.topic = f"{settings.prefix}/status/probe"
        self.echo_topic = f"{self.topic}/echo"
        self.warmup = warmup
        self.samples = samples
        self.timeout_s = timeout_s
        self.slow_ms = slow_ms
        #: the latest measurement; None until one succeeded
        self.last: RoundTrip | None = None
        self._active = threading.Event()
        self._waiting: dict[bytes, tuple[asyncio.AbstractEventLoop, asyncio.Future[float]]] = {}
        self._lock = threading.Lock()
        self._warned = False
        self._failed_once = False

    # ------------------------------------------------------------------ paho threads

    def echo(self, payload: bytes) -> None:
        """The agent's connection received a probe: send it straight back (paho's thread)."""
        if self._active.is_set() and len(payload) == 2 * _NONCE_BYTES:
            self.agent.publish(Outgoing(self.echo_topic, payload, 1))

    def _on_echo(self, msg: object) -> None:
        """The probe connection got an echo back (its paho thread): stamp it now."""
        now = time.perf_counter()
        payload = bytes(getattr(msg, "payload", b""))
        with self._lock:
            waiter = self._waiting.pop(payload, None)
        if waiter is not None:
            loop, fut = waiter
            loop.call_soon_threadsafe(_resolve, fut, now)

    # ------------------------------------------------------------------ on the loop

    async def watch(self, poll_s: float = 0.05) -> None:
        """Measure once after every (re)connect of the agent's connection, until cancelled."""
        measured_at = 0
        while True:
            connects = self.agent.status().connects
            if connects != measured_at and self.agent.subscribed_event.is_set():
                measured_at = connects
                try:
                    await self.measure()
                except Exception:  # a probe must never take the front end down
                    log.exception("MQTT broker round-trip probe failed")
            await asyncio.sleep(poll_s)

    async def measure(self) -> RoundTrip | None:
        """One probe session; None when the broker or its ACL would not carry the probes."""
        settings = dataclasses.replace(self.settings, client_id=f"{self.settings.client_id}-probe")
        prober = MqttConnection(settings, subscriptions=(self.echo_topic,), on_message=self._on_echo, quiet=True)
        self.agent.client.subscribe(self.topic, 1)
        self._active.set()
        prober.start()
        try:
            if not await asyncio.to_thread(prober.subscribed_event.wait, self.timeout_s * 2):
                self._failed(f"the probe connection did not get ready ({prober.status().last_error})")
                return None
            if prober.status().state == SUBSCRIBE_REFUSED:
                self._failed(f"the broker refused the subscription to {self.echo_topic}")
                return None
            times: list[float] = []
            for i in range(self.warmup + self.samples):
                ms = await self._one(prober)
                if ms is None:
                    self._failed(f"a probe on {self.topic} did not come back within {self.timeout_s:g} s")
                    return None
                if i >= self.warmup:
                    times.append(ms)
        finally:
            self._active.clear()
            self.agent.client.unsubscribe(self.topic)
            await asyncio.to_thread(prober.stop)
        result = RoundTrip(statistics.median(times), tuple(times), time.time())
        self.last = result
        self._report(result)
        return result

    async def _one(self, prober: MqttConnection) -> float | None:
        loop = asyncio.get_running_loop()
        nonce = os.urandom(_NONCE_BYTES).hex().encode()
        fut: asyncio.Future[float] = loop.create_future()
        with self._lock:
            self._waiting[nonce] = (loop, fut)
        t0 = time.perf_counter()
        if prober.status().state == CONNECTED:
            prober.publish(Outgoing(self.topic, nonce, 1))
        try:
            async with timeout(self.timeout_s):
                arrived = await fut
            return (arrived - t0) * 1000.0
        except asyncio.TimeoutError:
            return None
        finally:
            with self._lock:
                self._waiting.pop(nonce, None)

    def _failed(self, why: str) -> None:
        if not self._failed_once:
            self._failed_once = True
            log.info("MQTT broker round trip not measured: %s (the agent's user needs read and write on "
                     "%s/#)", why, self.topic)

    def _report(self, r: RoundTrip) -> None:
        if r.median_ms > self.slow_ms and not self._warned:
            self._warned = True
            log.warning(
                "MQTT broker %s: a request/reply round trip takes %.1f ms (median of %d QoS 1 probes), over "
                "%.0f ms. The broker most likely keeps Nagle's algorithm on its sockets, which adds about 40 ms "
                "to every MQTT request: set `%s` in mosquitto.conf (other brokers: their TCP_NODELAY option) "
                "and restart it.", self.settings.url, r.median_ms, len(r.samples_ms), self.slow_ms, BROKER_FIX)
        else:
            log.info("MQTT broker %s: request/reply round trip %.2f ms", self.settings.url, r.median_ms)
