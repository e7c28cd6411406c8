"""Inference over MQTT: the data plane's second transport, with the HTTP API's schema.

Topics (PREFIX defaults to `outpost/{device_id}`):

    PREFIX/models/{model}/infer                 request, latest version
    PREFIX/models/{model}/versions/{v}/infer    request, one version
    PREFIX/status                               retained {"state": "online", agent and model versions};
                                                Last Will {"state": "offline"}
    PREFIX/telemetry                            optional periodic health (--mqtt-telemetry-s)

Request payload: the v2 (KServe) JSON inference request, as POSTed over HTTP;
or its binary form, the JSON header followed by the raw tensor bytes
(`binary_data_size` per input, as the HTTP binary tensor extension), with the
header length in the MQTT 5 user property `Inference-Header-Content-Length`
or, for MQTT 3.1.1, a single NUL byte between header and tensor bytes.

Addressing: MQTT 5 Response Topic + Correlation Data (copied onto the reply);
MQTT 3.1.1 clients put `"reply_topic"` and `"correlation_id"` in the request's
`parameters` (the id is echoed in the reply's `parameters.correlation_id`).
A reply topic must match one of the allowed reply prefixes (default
`PREFIX/replies/#`) and never one of the device's own topics; otherwise the
request is refused, counted and logged, and nothing is published.

Replies: the HTTP response body (binary outputs framed as requests are); the
MQTT 5 user property `status` carries the HTTP-style status. Errors are the
HTTP error JSON plus the status: `{"error": "...", "status": 404}` (plus
`retry_after_s` on 503). A request may shorten its deadline with the user
property `Outpost-Timeout-Ms` (3.1.1: `parameters.timeout_ms`) or an MQTT 5
Message Expiry Interval. A QoS 1 redelivery (same reply topic and
correlation id within `duplicate_window_s`) is dropped: one run, one reply.

Latency: Mosquitto keeps Nagle's algorithm on its client sockets unless
`set_tcp_nodelay true` is set, which adds about 40 ms (a delayed ACK) to every
request/response round trip; set it on brokers that carry inference
(bench/README.md, "MQTT"). The agent disables Nagle on its own socket.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import ConnectionStatus
    from .frontend import MqttFrontEnd, MqttStatus
    from .settings import MqttSettings

# Imported on first use (PEP 562): `outpost serve` without --mqtt never loads paho-mqtt.
_LAZY = {"ConnectionStatus": ".connection", "MqttFrontEnd": ".frontend", "MqttStatus": ".frontend",
         "MqttSettings": ".settings"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConnectionStatus", "MqttFrontEnd", "MqttSettings", "MqttStatus"]
