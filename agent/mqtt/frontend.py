"""MQTT as a transport of the data plane: parse, call `DataPlane.infer`, serialise.

Threads: paho's network thread only copies each message onto the asyncio
loop (`call_soon_threadsafe`); everything else (topic rules, duplicate
window, decoding, inference, reply) runs on the loop, so MQTT requests share
the HTTP requests' batcher, validation, metrics and bounded queues, and the
network thread never waits on inference.

Nothing a client sends can stop the loop: each request is its own task,
every failure becomes an error reply (`{"error", "status"}`, the HTTP error
body plus its status), and requests with nowhere safe to reply are dropped,
counted and logged (throttled).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from agent.dataplane import DataPlane, deadline_after
from agent.errors import AgentError, InferenceFailed, InvalidRequest, PayloadTooLarge, Unavailable
from agent.protocol import dumps, encode_response

from . import envelope
from .connection import ConnectionStatus, MqttConnection
from .dedup import DuplicateCache
from .envelope import Addressing
from .outbox import Outgoing
from .probe import BrokerProbe
from .settings import MqttSettings
from .topics import RequestTarget, Topics

log = logging.getLogger("agent.mqtt")

#: MQTT 5 user property (HTTP's header name) / 3.1.1 request parameter: the request's own deadline.
TIMEOUT_HEADER = "Outpost-Timeout-Ms"
TIMEOUT_PARAM = "timeout_ms"


@dataclass(frozen=True)
class MqttStatus:
    """The broker link plus request counters, for health, telemetry and `outpost serve` output."""

    connection: ConnectionStatus
    requests: int
    replies: int
    errors: int
    duplicates: int
    refused_reply_topics: int
    unanswerable: int
    in_flight: int
    #: [probe] median request/reply round trip through the broker at the last connect; None: not measured
    broker_round_trip_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Throttled:
    """Log a recurring warning at most once per interval, with the count suppressed in between."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last = -float("inf")
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        log.warning(msg + more, *args)
        self._last, self._suppressed = now, 0


class MqttFrontEnd:
    def __init__(self, dataplane: DataPlane, settings: MqttSettings) -> None:
        self.dataplane = dataplane
        self.settings = settings
        self.topics = Topics(settings.prefix, settings.reply_prefixes)
        self._dedup = DuplicateCache(settings.duplicate_window_s, settings.duplicate_max_entries)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._telemetry: asyncio.Task[None] | None = None
        self._presence = b""
        self._refusals = _Throttled()
        self._unanswerable_log = _Throttled()
        self._counts = {"requests": 0, "replies": 0, "errors": 0, "refused": 0, "unanswerable": 0}
        self.connection = MqttConnection(
            settings, subscriptions=self.topics.request_filters, on_message=self._on_message,
            will=Outgoing(self.topics.status, self._presence_doc("offline"), 1, settings.status_retain),
            on_connected=self._on_connected)
        self.probe = BrokerProbe(settings, self.connection)  # [probe] times the broker at each connect
        self._probe_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start connecting (in the background: a broker that is down does not block serving)."""
        self._loop = asyncio.get_running_loop()
        self._presence = self._presence_doc("online")
        self.connection.start()
        self._probe_task = asyncio.create_task(self.probe.watch(), name="mqtt-broker-probe")  # [probe]
        if self.settings.telemetry_interval_s > 0:
            self._telemetry = asyncio.create_task(self._telemetry_forever(), name="mqtt-telemetry")

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Unsubscribe (no new requests), answer what is in flight (bounded), publish `offline`, disconnect."""
        self.connection.unsubscribe()
        if self._telemetry is not None:
            self._telemetry.cancel()
        if self._probe_task is not None:  # [probe]
            self._probe_task.cancel()
            await asyncio.wait({self._probe_task}, timeout=drain_timeout_s)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=drain_timeout_s)
        self._loop = None  # from here on, paho's thread drops incoming messages
        for task in set(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        goodbye = Outgoing(self.topics.status, self._presence_doc("offline"), 1, self.settings.status_retain)
        await asyncio.to_thread(self.connection.stop, goodbye)

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once connected and subscribed (requests published from now on arrive)."""
        return await asyncio.to_thread(self.connection.subscribed_event.wait, timeout_s)

    def status(self) -> MqttStatus:
        c = self._counts
        rtt = self.probe.last  # [probe]
        return MqttStatus(self.connection.status(), c["requests"], c["replies"], c["errors"],
                          self._dedup.duplicates, c["refused"], c["unanswerable"], len(self._tasks),
                          None if rtt is None else round(rtt.median_ms, 3))

    # ------------------------------------------------------------------ presence and telemetry

    def _presence_doc(self, state: str) -> bytes:
        doc: dict[str, Any] = {"state": state, "device_id": self.settings.device_id,
                               "agent_version": self.dataplane.server_metadata()["version"],
                               "time_unix": round(time.time(), 3)}
        if state == "online":
            doc["models"] = [{"name": sm.name, "version": sm.version, "backend": sm.runner.backend,
                              "verified": sm.verified} for sm in self.dataplane.models()]
        return dumps(doc)

    async def refresh_presence(self) -> None:
        """Publish a new `online` status after the served models changed."""
        self._presence = self._presence_doc("online")
        self.connection.publish(Outgoing(self.topics.status, self._presence, 1, self.settings.status_retain))

    def _on_connected(self) -> list[Outgoing]:
        # paho's thread: only reads the bytes prepared on the loop.
        return [Outgoing(self.topics.status, self._presence, 1, self.settings.status_retain)]

    async def _telemetry_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.telemetry_interval_s)
            try:
                tails = {f"{m}:{v}": dataclasses.asdict(t) for (m, v), t in self.dataplane.tail_latency().items()}
                doc = {"device_id": self.settings.device_id, "time_unix": round(time.time(), 3),
                       "live": self.dataplane.server_live(), "ready": self.dataplane.server_ready(),
                       "in_flight": self.dataplane.in_flight, "latency": tails, "mqtt": self.status().as_dict()}
                self.connection.publish(Outgoing(self.topics.telemetry, dumps(doc), 0))
            except Exception:
                log.exception("MQTT telemetry failed")

    # ------------------------------------------------------------------ requests

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        """paho's thread: copy out what is needed and hand it to the loop; nothing else."""
        loop = self._loop
        if loop is None:
            return
        if msg.topic == self.probe.topic:  # [probe] echo at once, from this thread, as a reply would go
            self.probe.echo(bytes(msg.payload))
            return
        props = getattr(msg, "properties", None)
        with contextlib.suppress(RuntimeError):  # the loop is closing: dropped with the agent
            loop.call_soon_threadsafe(self._accept, msg.topic, bytes(msg.payload), props)

    def _accept(self, topic: str, payload: bytes, props: Properties | None) -> None:
        """On the loop: cheap checks first, then a task per request."""
        target = self.topics.parse_request(topic)
        if target is None or self._loop is None:  # not ours, or stopping
            return
        self._counts["requests"] += 1
        addr = envelope.property_addressing(props)
        if addr is not None and not self._admit(addr, topic):
            return
        if len(self._tasks) >= self.settings.max_inflight_requests:
            self._reply_error(addr, Unavailable(
                f"{len(self._tasks)} MQTT requests in flight, limit {self.settings.max_inflight_requests}; "
                "retry later"), topic, payload, props)
            return
        task = asyncio.get_running_loop().create_task(self._serve(target, topic, payload, props, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _admit(self, addr: Addressing, topic: str) -> bool:
        """Reply-topic rule (threat 27), then the duplicate window (threat 26)."""
        assert addr.reply_topic is not None
        why = self.topics.reply_refusal(addr.reply_topic)
        if why is not None:
            self._counts["refused"] += 1
            self._refusals.warning("MQTT request on %s refused: %s", topic, why)
            return False
        key = addr.dedup_key
        if key is not None and not self._dedup.first_time(key):
            log.debug("MQTT duplicate of %r on %s dropped (answered once)", key, topic)
            return False
        return True

    async def _serve(self, target: RequestTarget, topic: str, payload: bytes, props: Properties | None,
                     addr: Addressing | None) -> None:
        users = envelope.user_properties(props)
        try:
            if len(payload) > self.settings.max_payload_bytes:
                raise PayloadTooLarge(len(payload), self.settings.max_payload_bytes, "MQTT payload")
            # 404 before decoding, as HTTP
            default_ms = self.dataplane.get(target.model, target.version).config.timeout_ms
            request = await envelope.decode_async(payload, users)
            if addr is None:
                addr = envelope.json_addressing(request.parameters)
                if addr is None:
                    self._unanswerable(topic, "it names no Response Topic and no parameters.reply_topic")
                    return
                if not self._admit(addr, topic):
                    return
            response = await self.dataplane.infer(target.model, target.version, request,
                                                  self._deadline(default_ms, props, users, request.parameters))
            if addr.correlation_id is not None:
                response = dataclasses.replace(
                    response, parameters={**response.parameters, envelope.CORRELATION_PARAM: addr.correlation_id})
            encoded = encode_response(response)
            self._publish(addr, 200, envelope.success_payload(addr, encoded), encoded.header_length)
            self._counts["replies"] += 1
        except AgentError as e:
            self._reply_error(addr, e, topic, payload, props)
        except Exception as e:  # a bug must cost one request, never the front end
            log.exception("MQTT request on %s failed", topic)
            self._reply_error(addr, InferenceFailed(f"internal error: {type(e).__name__}"), topic, payload, props)

    def _deadline(self, default_ms: float, props: Properties | None, users: dict[str, str],
                  params: Any) -> float:
        """As HTTP: a request may shorten the model's default deadline, never lengthen it.

        MQTT 5 clients send the HTTP header's name as a user property (or a
        Message Expiry Interval); 3.1.1 clients `parameters.timeout_ms`.
        """
        budget_ms = default_ms
        raw = users.get(TIMEOUT_HEADER, params.get(TIMEOUT_PARAM))
        if raw is not None:
            try:
                ms = float(raw)
            except (TypeError, ValueError):
                ms = -1.0
            if not ms > 0:
                raise InvalidRequest(f"{TIMEOUT_HEADER} / parameters.{TIMEOUT_PARAM} must be a positive "
                                     f"number of milliseconds, got {raw!r}")
            budget_ms = min(budget_ms, ms)
        expiry_s = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        if expiry_s:
            budget_ms = min(budget_ms, float(expiry_s) * 1000.0)
        return deadline_after(budget_ms)

    def _reply_error(self, addr: Addressing | None, error: AgentError, topic: str, payload: bytes,
                     props: Properties | None) -> None:
        if addr is None:
            addr = envelope.salvage_addressing(payload, envelope.user_properties(props))
            if addr is None:
                self._unanswerable(topic, f"it failed ({error.status}: {error.message}) and names nowhere to reply")
                return
            if not self._admit(addr, topic):
                return
        self._counts["errors"] += 1
        self._publish(addr, error.status, envelope.error_payload(addr, error), None)

    def _unanswerable(self, topic: str, why: str) -> None:
        self._counts["unanswerable"] += 1
        self._unanswerable_log.warning("MQTT request on %s dropped: %s", topic, why)

    def _publish(self, addr: Addressing, status: int, payload: bytes, header_length: int | None) -> None:
        assert addr.reply_topic is not None
        props = envelope.reply_properties(addr, status, header_length)
        self.connection.publish(Outgoing(addr.reply_topic, payload, self.settings.qos, False, props))
