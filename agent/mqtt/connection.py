"""The broker connection: paho-mqtt 2.x in its own network thread.

Knows nothing about inference. It connects, subscribes on *every* connect
(a restarted broker has forgotten us), hands each incoming message to a
callback that must only schedule work (the front end passes it to the
asyncio loop with `call_soon_threadsafe`), and publishes from any thread.

Reconnects use paho's own loop (`loop_start`) with the delay of each attempt
drawn by `Backoff` (exponential, capped, full jitter) and set just before
paho waits. Replies made while the broker is away wait in a bounded
`Outbox` (oldest dropped and counted); paho's own queue of unacknowledged
QoS 1/2 messages is capped too, so an outage costs bounded memory.

Connection state changes (connected, lost, refused, bad credentials) are
logged once when they happen, not on every retry, and kept in `status()`
for the health/status output.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .backoff import Backoff
from .outbox import Outbox, Outgoing
from .settings import MqttSettings

log = logging.getLogger("agent.mqtt")

#: CONNACK reason codes that mean "your credentials are wrong" (MQTT 5 and 3.1.1 numbering).
_AUTH_CODES = {0x86, 0x87, 0x04, 0x05, 0x8C}

STARTING, CONNECTED, DISCONNECTED, AUTH_FAILED, REFUSED, SUBSCRIBE_REFUSED, STOPPED = (
    "starting", "connected", "disconnected", "auth_failed", "refused", "subscribe_refused", "stopped")


@dataclass(frozen=True)
class ConnectionStatus:
    """What health and status output show about the broker link."""

    state: str
    broker: str
    client_id: str
    last_error: str | None
    since_unix: float
    connects: int
    connect_failures: int
    outbox: int
    dropped: int


MessageHandler = Callable[[mqtt.MQTTMessage], None]


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Disable Nagle on the broker socket (paho does not).

    A reply is a small write right after the request's PUBACK; with Nagle it
    waits for the broker's delayed ACK, about 40 ms per round trip.
    """
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttConnection:
    def __init__(self, settings: MqttSettings, *, subscriptions: Sequence[str],
                 on_message: MessageHandler, will: Outgoing | None = None,
                 on_connected: Callable[[], Sequence[Outgoing]] | None = None, quiet: bool = False) -> None:
        self.settings = settings
        #: [probe] state changes logged at DEBUG only (the broker probe's own short-lived connection)
        self.quiet = quiet
        self._subscriptions = tuple(subscriptions)
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self.outbox = Outbox(settings.outbox_max_messages)
        self._lock = threading.Lock()
        self._state = STARTING
        self._last_error: str | None = None
        self._since = time.time()
        self._connects = 0
        self._failures = 0
        #: set on a successful CONNACK (publishing works), cleared on disconnect
        self.connected_event = threading.Event()
        #: set once the broker acknowledged the request subscriptions (requests will arrive)
        self.subscribed_event = threading.Event()
        self._subscribe_mid: int | None = None
        self.client = self._make_client(will)

    # ------------------------------------------------------------------ set-up

    def _make_client(self, will: Outgoing | None) -> mqtt.Client:
        s = self.settings
        v5 = s.protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id,
                             protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                             clean_session=None if v5 else True, reconnect_on_failure=True)
        # No client.enable_logger(): paho logs an ERROR on every loop pass while disconnected,
        # i.e. on every retry; this module logs state changes instead.
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            client.tls_set(ca_certs=str(s.ca_path) if s.ca_path else None,
                           certfile=str(s.cert_path) if s.cert_path else None,
                           keyfile=str(s.key_path) if s.key_path else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            client.will_set(will.topic, will.payload, will.qos, will.retain)
        client.max_queued_messages_set(s.max_unacked_messages)
        client.connect_timeout = s.connect_timeout_s
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = _no_delay
        return client

    def start(self) -> None:
        """Begin connecting in paho's thread; returns at once (the broker may be down)."""
        first = self.settings.reconnect_min_s
        self.client.reconnect_delay_set(first, first)  # type: ignore[arg-type]  # floats work
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
        self.client.loop_start()

    def stop(self, goodbye: Outgoing | None = None, timeout_s: float = 3.0) -> None:
        """Blocking: say goodbye if connected, disconnect, join the network thread."""
        if goodbye is not None and self.connected_event.is_set():
            try:
                info = self.client.publish(goodbye.topic, goodbye.payload, goodbye.qos, goodbye.retain,
                                           goodbye.properties)
                if goodbye.qos > 0:
                    info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError) as e:
                log.debug("MQTT goodbye not sent: %s", e)
        self._set_state(STOPPED, None)
        self.client.disconnect()
        self.client.loop_stop()
        # paho closes its wake-up socket pair only in __del__ (or here), and a reference cycle
        # through our callbacks can leave that to the garbage collector: release it now.
        self.client.reinitialise()

    def unsubscribe(self) -> None:
        """Draining: the broker delivers no more requests (nor after a reconnect); replies still go out."""
        topics, self._subscriptions = list(self._subscriptions), ()
        self.subscribed_event.clear()
        if topics and self.connected_event.is_set():
            with contextlib.suppress(ValueError, RuntimeError):
                self.client.unsubscribe(topics)

    # ------------------------------------------------------------------ publishing

    def publish(self, msg: Outgoing) -> None:
        """Thread-safe and non-blocking: hand to paho now, or wait in the outbox."""
        if self.connected_event.is_set() and not len(self.outbox) and self._hand_over(msg):
            return
        self.outbox.put(msg)
        if self.connected_event.is_set():
            self._drain()

    def _hand_over(self, msg: Outgoing) -> bool:
        try:
            info = self.client.publish(msg.topic, msg.payload, msg.qos, msg.retain, msg.properties)
        except ValueError as e:  # invalid topic or payload: never retry it
            log.warning("MQTT publish to %r refused by the client: %s", msg.topic, e)
            return True
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return True
        # QoS 1/2 while not connected: paho keeps it and sends it after reconnecting.
        return info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and msg.qos > 0

    def _drain(self) -> None:
        while self.connected_event.is_set():
            msg = self.outbox.pop()
            if msg is None:
                return
            if not self._hand_over(msg):
                self.outbox.put_front(msg)
                return

    # ------------------------------------------------------------------ paho callbacks (network thread)
    # paho re-raises exceptions from callbacks and that would end its thread: each callback
    # here catches everything and logs it.

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        try:
            if reason.is_failure:
                self._refused(reason)
                return
            self._backoff.reset()
            if self._subscriptions:
                _, self._subscribe_mid = client.subscribe([(t, self.settings.qos) for t in self._subscriptions])
            self.connected_event.set()
            self._set_state(CONNECTED, None)
            with self._lock:
                self._connects += 1
            if self._on_connected_cb is not None:
                for msg in self._on_connected_cb():
                    self._hand_over(msg)
            self._drain()
        except Exception:
            log.exception("MQTT on_connect failed")

    def _refused(self, reason: ReasonCode) -> None:
        with self._lock:
            self._failures += 1
        user = f" as user {self.settings.username!r}" if self.settings.username else " anonymously"
        if reason.value in _AUTH_CODES:
            self._set_state(AUTH_FAILED, f"MQTT broker {self.settings.url} refused the connection{user}: "
                                         f"{reason} (check --mqtt-username/--mqtt-password); retrying")
        else:
            self._set_state(REFUSED, f"MQTT broker {self.settings.url} refused the connection{user}: "
                                     f"{reason}; retrying")
        # paho follows a refused CONNACK with on_disconnect, which schedules the retry.

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            with self._lock:
                self._failures += 1
            # paho calls this inside its `except OSError`: the exception says why (refused, TLS, DNS).
            exc = sys.exc_info()[1]
            why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
            self._set_state(DISCONNECTED, f"MQTT broker {self.settings.url} is unreachable{why}; retrying")
            self._schedule_retry()
        except Exception:
            log.exception("MQTT on_connect_fail failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        try:
            self.connected_event.clear()
            self.subscribed_event.clear()
            with self._lock:
                state = self._state
            if state in (STOPPED, AUTH_FAILED, REFUSED):
                # A refused CONNACK is followed by this disconnect: keep the clearer reason.
                if state != STOPPED:
                    self._schedule_retry()
                return
            from_broker = bool(getattr(flags, "is_disconnect_packet_from_server", False))
            why = f"the broker disconnected us ({reason})" if from_broker else "connection lost"
            self._set_state(DISCONNECTED, f"lost the MQTT broker {self.settings.url}: {why}; reconnecting")
            self._schedule_retry()
        except Exception:
            log.exception("MQTT on_disconnect failed")

    def _schedule_retry(self) -> None:
        delay = self._backoff.next_delay_s()
        self.client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]  # floats work

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        try:
            if mid != self._subscribe_mid:
                return
            refused = [(t, str(r)) for t, r in zip(self._subscriptions, reasons, strict=False)
                       if r.is_failure]
            if refused:
                # The broker's ACL said no: requests will never arrive; say so once, loudly.
                self._set_state(SUBSCRIBE_REFUSED, f"MQTT broker {self.settings.url} refused the subscriptions "
                                         f"{refused} for client {self.settings.client_id!r}; check its ACL")
            self.subscribed_event.set()
        except Exception:
            log.exception("MQTT on_subscribe failed")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._on_message_cb(msg)
        except Exception:
            log.exception("MQTT message handler failed on %r", msg.topic)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        try:
            if len(self.outbox):
                self._drain()
        except Exception:
            log.exception("MQTT outbox drain failed")

    # ------------------------------------------------------------------ state

    def _set_state(self, state: str, error: str | None) -> None:
        with self._lock:
            changed = (state, error) != (self._state, self._last_error)
            was = self._state
            self._state, self._last_error = state, error
            if changed:
                self._since = time.time()
        if not changed:
            return
        if self.quiet:  # [probe]
            log.debug("MQTT %s: %s (%s)", self.settings.client_id, state, error)
        elif state == CONNECTED:
            log.info("MQTT connected to %s as %r%s", self.settings.url, self.settings.client_id,
                     " (reconnected)" if was != STARTING else "")
        elif state in (AUTH_FAILED, REFUSED, SUBSCRIBE_REFUSED):
            log.error("%s", error)
        elif state == DISCONNECTED:
            log.warning("%s", error)

    def status(self) -> ConnectionStatus:
        with self._lock:
            return ConnectionStatus(self._state, self.settings.url, self.settings.client_id,
                                    self._last_error, self._since, self._connects, self._failures,
                                    len(self.outbox), self.outbox.dropped)
