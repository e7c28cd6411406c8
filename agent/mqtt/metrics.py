"""The MQTT link on the data plane's `/metrics`: state, counters, outbox.

A collector read at scrape time (no second copy of the counters), registered
on the data plane's own registry so HTTP's `/metrics` shows whether MQTT is
connected, and why not (a `state` label such as `auth_failed`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .connection import AUTH_FAILED, CONNECTED, DISCONNECTED, REFUSED, STARTING, STOPPED, SUBSCRIBE_REFUSED
from .frontend import MqttStatus

STATES = (STARTING, CONNECTED, DISCONNECTED, AUTH_FAILED, REFUSED, SUBSCRIBE_REFUSED, STOPPED)


class MqttCollector(Collector):
    def __init__(self, status: Callable[[], MqttStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        c = s.connection
        yield GaugeMetricFamily("outpost_mqtt_connected", "1 while connected to the MQTT broker.",
                                value=1.0 if c.state == CONNECTED else 0.0)
        state = GaugeMetricFamily("outpost_mqtt_state", "MQTT link state (1 for the current one).",
                                  labels=["state"])
        for name in STATES:
            state.add_metric([name], 1.0 if c.state == name else 0.0)
        yield state
        yield GaugeMetricFamily("outpost_mqtt_outbox_messages", "Replies waiting for the broker.", value=c.outbox)
        yield GaugeMetricFamily("outpost_mqtt_in_flight_requests", "MQTT requests being served.",
                                value=s.in_flight)
        if s.broker_round_trip_ms is not None:  # [probe]
            yield GaugeMetricFamily(
                "outpost_mqtt_broker_round_trip_seconds",
                "Median QoS 1 request/reply round trip through the broker, measured at the last connect "
                "(tens of ms: the broker needs set_tcp_nodelay true).", value=s.broker_round_trip_ms / 1000.0)
        for name, doc, value in (
            ("outpost_mqtt_connects", "Successful connections to the broker.", c.connects),
            ("outpost_mqtt_connect_failures", "Refused or failed connection attempts.", c.connect_failures),
            ("outpost_mqtt_outbox_dropped", "Messages dropped from the full outbox (oldest first).", c.dropped),
            ("outpost_mqtt_requests", "MQTT inference requests received.", s.requests),
            ("outpost_mqtt_replies", "Successful MQTT replies.", s.replies),
            ("outpost_mqtt_error_replies", "MQTT error replies.", s.errors),
            ("outpost_mqtt_duplicates", "QoS 1 redeliveries dropped (answered once).", s.duplicates),
            ("outpost_mqtt_refused_reply_topics", "Requests refused for their reply topic.",
             s.refused_reply_topics),
            ("outpost_mqtt_unanswerable", "Requests dropped with nowhere to reply.", s.unanswerable),
        ):
            yield CounterMetricFamily(name, doc, value=value)
