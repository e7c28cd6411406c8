"""What an MQTT request carries besides the v2 body, and how replies are framed.

Payload (documented in `agent/mqtt/__init__.py`): the v2 JSON inference request,
or the binary form of the HTTP binary tensor extension: the JSON header
followed by the raw tensor bytes. The header's length comes from the MQTT 5
user property `Inference-Header-Content-Length` (the HTTP header's name), or,
for MQTT 3.1.1 clients that cannot send properties, from a single NUL byte
between header and tail (JSON text never contains a raw NUL). The codec is
`agent.protocol`'s, shared with HTTP.

Addressing: MQTT 5 Response Topic and Correlation Data, copied onto the
reply; for MQTT 3.1.1, `parameters.reply_topic` and
`parameters.correlation_id` inside the JSON request, echoed in the reply's
`parameters.correlation_id`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import decoding
from agent.errors import AgentError, InvalidRequest
from agent.protocol import EncodedResponse, InferRequest, decode_request, dumps, parse_json

HEADER_LENGTH_PROPERTY = "Inference-Header-Content-Length"
STATUS_PROPERTY = "status"
REPLY_TOPIC_PARAM = "reply_topic"
CORRELATION_PARAM = "correlation_id"
SEPARATOR = b"\0"


@dataclass(frozen=True)
class Addressing:
    """Where a reply goes and how the requester matches it to its request."""

    reply_topic: str | None
    correlation: bytes | None  # MQTT 5 Correlation Data, or the UTF-8 of correlation_id
    correlation_id: str | None = None  # the JSON form (3.1.1), echoed in the body
    mqtt5: bool = False  # reply with MQTT 5 properties (Correlation Data, user properties)

    @property
    def dedup_key(self) -> tuple[str, bytes] | None:
        if self.reply_topic is None or self.correlation is None:
            return None
        return (self.reply_topic, self.correlation)


def property_addressing(props: Properties | None) -> Addressing | None:
    """The MQTT 5 Response Topic and Correlation Data, if the request has them."""
    topic = getattr(props, "ResponseTopic", None) if props is not None else None
    if not topic:
        return None
    corr = getattr(props, "CorrelationData", None)
    return Addressing(str(topic), bytes(corr) if corr is not None else None, None, True)


def user_properties(props: Properties | None) -> dict[str, str]:
    pairs = getattr(props, "UserProperty", None) if props is not None else None
    return {str(k): str(v) for k, v in pairs or ()}


def json_addressing(params: Mapping[str, Any]) -> Addressing | None:
    """The MQTT 3.1.1 fallback: reply topic and correlation id inside the request."""
    topic = params.get(REPLY_TOPIC_PARAM)
    if topic is None:
        return None
    if not isinstance(topic, str):
        raise InvalidRequest(f"parameters.{REPLY_TOPIC_PARAM} must be a string")
    cid = params.get(CORRELATION_PARAM)
    if cid is not None and not isinstance(cid, (str, int)):
        raise InvalidRequest(f"parameters.{CORRELATION_PARAM} must be a string or an integer")
    cid_s = None if cid is None else str(cid)
    return Addressing(topic, None if cid_s is None else cid_s.encode(), cid_s, False)


def split_payload(payload: bytes, props: Mapping[str, str]) -> tuple[bytes, int | str | None]:
    """(body, header length) for `agent.protocol.decode_request`."""
    length = props.get(HEADER_LENGTH_PROPERTY)
    if length is not None:
        return payload, length
    nul = payload.find(SEPARATOR)
    if nul < 0:
        return payload, None
    if nul == 0:
        raise InvalidRequest("the payload starts with the NUL separator: the JSON header is missing")
    if nul == len(payload) - 1:
        return payload[:nul], None
    return payload[:nul] + payload[nul + 1:], nul


def decode(payload: bytes, props: Mapping[str, str]) -> InferRequest:
    body, header_length = split_payload(payload, props)
    return decode_request(body, header_length)


async def decode_async(payload: bytes, props: Mapping[str, str]) -> InferRequest:
    """As HTTP bodies are decoded: big JSON off the event loop (`agent.decoding`)."""
    body, header_length = split_payload(payload, props)
    return await decoding.decode_request(body, header_length)


def salvage_addressing(payload: bytes, props: Mapping[str, str]) -> Addressing | None:
    """After a decode failure, still find a 3.1.1 reply topic so the error can be answered."""
    try:
        length = props.get(HEADER_LENGTH_PROPERTY)
        if length is not None:
            header: bytes = payload[:int(length)]
        else:
            nul = payload.find(SEPARATOR)
            header = payload if nul < 0 else payload[:nul]
        doc = parse_json(header)
        if isinstance(doc, dict) and isinstance(doc.get("parameters"), dict):
            return json_addressing(doc["parameters"])
    except (AgentError, ValueError):
        pass
    return None


def reply_properties(addr: Addressing, status: int, header_length: int | None) -> Properties | None:
    if not addr.mqtt5:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if addr.correlation is not None:
        props.CorrelationData = addr.correlation
    users = [(STATUS_PROPERTY, str(status))]
    if header_length is not None:
        users.append((HEADER_LENGTH_PROPERTY, str(header_length)))
    props.UserProperty = users
    props.ContentType = "application/json" if header_length is None else "application/octet-stream"
    return props


def success_payload(addr: Addressing, encoded: EncodedResponse) -> bytes:
    """The reply body: the HTTP response body, with the 3.1.1 framing where needed."""
    if not encoded.tail:
        return encoded.header
    if addr.mqtt5:
        return encoded.body()
    return b"".join((encoded.header, SEPARATOR, *encoded.tail))


def error_payload(addr: Addressing | None, error: AgentError) -> bytes:
    """HTTP's error JSON plus the status code (and the 3.1.1 correlation id)."""
    doc: dict[str, Any] = {"error": error.message, "status": error.status}
    retry = getattr(error, "retry_after_s", None)
    if retry is not None:
        doc["retry_after_s"] = retry
    if addr is not None and addr.correlation_id is not None:
        doc[CORRELATION_PARAM] = addr.correlation_id
    return dumps(doc)
