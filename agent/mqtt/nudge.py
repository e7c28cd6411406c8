"""The fleet's MQTT nudge: a wake-up call for the sync coordinator, never a source of truth.

The fleet publishes ``{"serial": N}`` on ``outpost/devices/{device_id}/nudge``
when it changes this device's assignment (`fleet serve --nudge-mqtt`). The
message is unsigned and anyone allowed on the topic can send it, so it is
used for exactly one thing: to ask the fleet now instead of waiting for the
long-poll. The assignment itself is still fetched over HTTP and verified
(signature, device, serial, expiry) as on every poll; a forged nudge can at
most cost one extra poll. A nudge naming a serial the device already holds
is ignored, and bursts are folded into one wake-up by the coordinator.

The listener has its own MQTT connection (client id ``...-nudge``), so it
works whether or not the MQTT inference front end is on, and paho's thread
only hands the serial to the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable

import paho.mqtt.client as mqtt

from .connection import MqttConnection
from .settings import MqttSettings

log = logging.getLogger(__name__)

#: the fleet's default (`fleet.config` nudge_topic)
NUDGE_TOPIC = "outpost/devices/{device_id}/nudge"
#: a nudge is a dozen bytes; anything much larger is not one
MAX_NUDGE_BYTES = 256


def parse_nudge(payload: bytes) -> int | None:
    """The serial a nudge names, or None for anything else (which is then ignored)."""
    if len(payload) > MAX_NUDGE_BYTES:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    serial = doc.get("serial") if isinstance(doc, dict) else None
    return serial if type(serial) is int and serial >= 0 else None


class NudgeListener:
    """Subscribes to this device's nudge topic and calls `on_nudge(serial)` on the event loop."""

    def __init__(self, settings: MqttSettings, device_id: str, on_nudge: Callable[[int], None],
                 topic: str = NUDGE_TOPIC) -> None:
        self.topic = topic.format(device_id=device_id)
        self.on_nudge = on_nudge
        self.received = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        nudge_settings = dataclasses.replace(settings, client_id=f"{settings.client_id}-nudge"[:64])
        self.connection = MqttConnection(nudge_settings, subscriptions=[self.topic], on_message=self._message)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.connection.start()
        log.info("listening for fleet nudges on %s", self.topic)

    def stop(self) -> None:
        self.connection.stop()

    def _message(self, msg: mqtt.MQTTMessage) -> None:  # paho's thread
        serial = parse_nudge(bytes(msg.payload))
        if serial is None or self._loop is None:
            log.debug("ignored a malformed nudge on %s", msg.topic)
            return
        self.received += 1
        self._loop.call_soon_threadsafe(self.on_nudge, serial)
