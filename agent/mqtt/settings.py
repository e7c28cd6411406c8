"""MQTT front-end settings: one frozen object, safe defaults, units in names.

Built from a broker URL (`mqtt://` or `mqtts://`) plus explicit options, so
`outpost serve --mqtt URL` and the agent daemon share one parser. Everything
that lets a request make the agent publish somewhere (the reply prefixes) is
here and nowhere else, and defaults to the device's own `replies/` subtree.
"""

from __future__ import annotations

import pathlib
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import unquote, urlsplit

from agent.errors import ConfigError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

#: Characters allowed in a device id: it becomes a topic level and a client id.
_DEVICE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def default_device_id() -> str:
    """The host name, reduced to what is safe in a topic level."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].strip("-")
    return name or "outpost"


def _check_topic(topic: str, what: str, *, wildcards: bool) -> None:
    if not topic or len(topic.encode()) > 65535 or "\0" in topic:
        raise ConfigError(f"{what} {topic!r} is not a valid MQTT topic")
    if not wildcards and ("+" in topic or "#" in topic):
        raise ConfigError(f"{what} {topic!r} must not contain the wildcards + or #")
    if wildcards:
        levels = topic.split("/")
        for i, level in enumerate(levels):
            if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
                raise ConfigError(f"{what} {topic!r}: + must fill a whole level and # must be the last one")


@dataclass(frozen=True)
class MqttSettings:
    """How the agent talks to its broker.

    reply_prefixes: topic filters (with + and #) a request's Response Topic
      must match; anything else is refused so that a request cannot make the
      agent publish onto another device's or a control topic.
    outbox_max_messages: replies and presence messages held while the broker
      is away; past it the oldest is dropped and counted (memory stays flat).
    max_unacked_messages: QoS 1/2 messages handed to paho and not yet
      acknowledged by the broker (paho resends them after a reconnect); past
      it new ones wait in the outbox. Outbox + this bound the memory an
      outage can cost.
    duplicate_window_s: how long a (reply topic, correlation id) pair is
      remembered to answer a QoS 1 redelivery once, never run it twice.
    """

    host: str
    port: int = 1883
    tls: bool = False
    ca_path: pathlib.Path | None = None
    cert_path: pathlib.Path | None = None
    key_path: pathlib.Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    device_id: str = field(default_factory=default_device_id)
    client_id: str = ""
    prefix: str = ""
    qos: int = 1
    protocol: str = "5"  # "5" or "3.1.1"
    reply_prefixes: tuple[str, ...] = ()
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    outbox_max_messages: int = 1000
    max_unacked_messages: int = 1000
    duplicate_window_s: float = 120.0
    duplicate_max_entries: int = 10_000
    max_inflight_requests: int = 256
    max_payload_bytes: int = 64 * 1024 * 1024
    telemetry_interval_s: float = 0.0  # 0 = off
    status_retain: bool = True

    def __post_init__(self) -> None:
        if not _DEVICE_ID.match(self.device_id):
            raise ConfigError(f"device id {self.device_id!r}: use 1-64 of A-Z a-z 0-9 . _ -")
        if not self.client_id:
            object.__setattr__(self, "client_id", f"outpost-{self.device_id}")
        if not self.prefix:
            object.__setattr__(self, "prefix", f"outpost/{self.device_id}")
        object.__setattr__(self, "prefix", self.prefix.rstrip("/"))
        _check_topic(self.prefix, "topic prefix", wildcards=False)
        if not self.reply_prefixes:
            object.__setattr__(self, "reply_prefixes", (f"{self.prefix}/replies/#",))
        for p in self.reply_prefixes:
            _check_topic(p, "reply prefix", wildcards=True)
        if self.qos not in (0, 1, 2):
            raise ConfigError(f"QoS must be 0, 1 or 2, not {self.qos}")
        if self.protocol not in ("5", "3.1.1"):
            raise ConfigError(f"MQTT protocol must be '5' or '3.1.1', not {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker port {self.port} is out of range")
        if (self.cert_path is None) != (self.key_path is None):
            raise ConfigError("a client certificate needs its key, and a key its certificate")
        if not self.tls and (self.ca_path or self.cert_path):
            raise ConfigError("--mqtt-ca/--mqtt-cert/--mqtt-key need an mqtts:// broker URL")
        if self.reconnect_min_s <= 0 or self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError("reconnect delays must satisfy 0 < min <= max")
        for name in ("outbox_max_messages", "max_unacked_messages", "duplicate_max_entries", "max_inflight_requests",
                     "max_payload_bytes", "keepalive_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")

    @property
    def url(self) -> str:
        """The broker address without credentials, safe to log and report."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @classmethod
    def from_url(cls, url: str, **options: object) -> MqttSettings:
        """`mqtt://[user[:password]@]host[:port]`; explicit options win over the URL's."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ConfigError(f"broker URL {url!r}: the scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r} has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"broker URL {url!r}: only scheme, credentials, host and port are allowed")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError as e:
            raise ConfigError(f"broker URL {url!r}: {e}") from e
        given: dict[str, object] = {k: v for k, v in options.items() if v is not None}
        if parts.username and "username" not in given:
            given["username"] = unquote(parts.username)
        if parts.password and "password" not in given:
            given["password"] = unquote(parts.password)
        for key in ("ca_path", "cert_path", "key_path"):
            if key in given:
                given[key] = pathlib.Path(str(given[key]))
        prefixes = given.get("reply_prefixes")
        if isinstance(prefixes, str):
            given["reply_prefixes"] = (prefixes,)
        elif prefixes is not None:
            given["reply_prefixes"] = tuple(cast(Iterable[str], prefixes))
        return cls(host=parts.hostname, port=port, tls=scheme == "mqtts", **given)  # type: ignore[arg-type]
