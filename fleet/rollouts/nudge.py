"""MQTT wake-ups: tell devices whose assignment a rollout changed to sync now, not at the next long-poll.

The message is only a hint (``{"serial": N}``, QoS 1, not retained): a device
still fetches and verifies the signed assignment over HTTP, so a forged nudge
can at most make it poll early. paho runs its network loop in its own
thread; publishing from the event loop only queues the message.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)


class MqttNudger:
    def __init__(self, url: str, topic: str) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"nudge broker URL {url!r}: expected mqtt://host:port or mqtts://host:port")
        self.topic = topic
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"outpost-fleet-{uuid.uuid4().hex[:12]}")
        if u.username:
            self.client.username_pw_set(urllib.parse.unquote(u.username),
                                        urllib.parse.unquote(u.password or ""))
        if u.scheme == "mqtts":
            self.client.tls_set()
        self.client.reconnect_delay_set(1, 30)
        self.client.connect_async(u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883))
        self.client.loop_start()
        self.sent = 0

    def nudge(self, serials: dict[str, int]) -> None:
        for device_id, serial in serials.items():
            info = self.client.publish(self.topic.format(device_id=device_id),
                                       json.dumps({"serial": serial}), qos=1)
            if info.rc == mqtt.MQTT_ERR_SUCCESS or info.rc == mqtt.MQTT_ERR_NO_CONN:
                self.sent += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
