"""The topic tree a device answers on, and the rule for where it may reply.

    {prefix}/models/{model}/infer                  requests (latest version)
    {prefix}/models/{model}/versions/{v}/infer     requests (one version)
    {prefix}/status                                retained online/offline presence
    {prefix}/telemetry                             optional periodic health
    {prefix}/replies/...                           default home of Response Topics

Pure functions over strings, so the refusal rule (threat 27) is tested
without a broker.
"""

from __future__ import annotations

from dataclasses import dataclass

from paho.mqtt.client import topic_matches_sub


@dataclass(frozen=True)
class RequestTarget:
    model: str
    version: str | None = None


class Topics:
    def __init__(self, prefix: str, reply_prefixes: tuple[str, ...]) -> None:
        self.prefix = prefix
        self.reply_prefixes = reply_prefixes
        self.status = f"{prefix}/status"
        self.telemetry = f"{prefix}/telemetry"
        self.request_filters = (f"{prefix}/models/+/infer", f"{prefix}/models/+/versions/+/infer")
        self._levels = len(prefix.split("/"))

    def request_topic(self, model: str, version: str | None = None) -> str:
        if version is None:
            return f"{self.prefix}/models/{model}/infer"
        return f"{self.prefix}/models/{model}/versions/{version}/infer"

    def parse_request(self, topic: str) -> RequestTarget | None:
        """The model (and version) a request topic names; None for any other topic."""
        if not topic.startswith(self.prefix + "/"):
            return None
        rest = topic.split("/")[self._levels:]
        if len(rest) == 3 and rest[0] == "models" and rest[2] == "infer" and rest[1]:
            return RequestTarget(rest[1])
        if (len(rest) == 5 and rest[0] == "models" and rest[2] == "versions" and rest[4] == "infer"
                and rest[1] and rest[3]):
            return RequestTarget(rest[1], rest[3])
        return None

    def reply_refusal(self, topic: str) -> str | None:
        """Why the agent must not publish a reply on `topic`, or None when it may."""
        if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic.encode()) > 65535:
            return f"reply topic {topic!r} is not a valid topic to publish on"
        if topic.startswith("$"):
            return f"reply topic {topic!r} is a broker system topic"
        if topic in (self.status, self.telemetry) or self.parse_request(topic) is not None:
            return f"reply topic {topic!r} is one of this device's own request or presence topics"
        if not any(topic_matches_sub(f, topic) for f in self.reply_prefixes):
            return f"reply topic {topic!r} is outside the allowed reply prefixes {list(self.reply_prefixes)}"
        return None
