"""The MQTT front end's pure parts: settings, topic rules, duplicate window, outbox, backoff, framing."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import ConfigError, InvalidRequest, ModelNotFound, Overloaded
from agent.mqtt.backoff import Backoff
from agent.mqtt.dedup import DuplicateCache
from agent.mqtt.envelope import (
    HEADER_LENGTH_PROPERTY,
    Addressing,
    decode,
    error_payload,
    json_addressing,
    salvage_addressing,
    split_payload,
)
from agent.mqtt.outbox import Outbox, Outgoing
from agent.mqtt.settings import MqttSettings
from agent.mqtt.topics import RequestTarget, Topics
from agent.protocol import parse_json

# ----------------------------------------------------------------------------- settings


def test_settings_defaults_follow_the_device_id() -> None:
    s = MqttSettings.from_url("mqtt://broker.local", device_id="cam-7")
    assert (s.host, s.port, s.tls) == ("broker.local", 1883, False)
    assert s.prefix == "outpost/cam-7"
    assert s.client_id == "outpost-cam-7"
    assert s.reply_prefixes == ("outpost/cam-7/replies/#",)
    assert s.qos == 1 and s.protocol == "5"


def test_settings_url_credentials_and_tls(tmp_path: object) -> None:
    s = MqttSettings.from_url("mqtts://dev%40x:s3cr%2Ft@10.0.0.1", device_id="d1", ca_path="/etc/ca.pem")
    assert s.port == 8883 and s.tls
    assert (s.username, s.password) == ("dev@x", "s3cr/t")
    assert "s3cr" not in repr(s) and "s3cr" not in s.url
    explicit = MqttSettings.from_url("mqtt://u:p@h:1999", device_id="d1", username="other", password="pw2")
    assert (explicit.port, explicit.username, explicit.password) == (1999, "other", "pw2")


@pytest.mark.parametrize(("url", "opts", "fragment"), [
    ("http://h", {}, "scheme"),
    ("mqtt://", {}, "no host"),
    ("mqtt://h/path", {}, "only scheme"),
    ("mqtt://h:99999", {}, "(?i)port"),
    ("mqtt://h", {"prefix": "a/+/b"}, "wildcards"),
    ("mqtt://h", {"reply_prefixes": ("a/#/b",)}, "last one"),
    ("mqtt://h", {"qos": 3}, "QoS"),
    ("mqtt://h", {"device_id": "bad id/with slash"}, "device id"),
    ("mqtt://h", {"ca_path": "/ca.pem"}, "mqtts://"),
    ("mqtts://h", {"cert_path": "/c.pem"}, "key"),
    ("mqtt://h", {"protocol": "4"}, "protocol"),
])
def test_settings_refuse_bad_values(url: str, opts: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        MqttSettings.from_url(url, device_id=opts.pop("device_id", "d1"), **opts)


# ----------------------------------------------------------------------------- topics


def test_request_topics_parse() -> None:
    t = Topics("outpost/d1", ("outpost/d1/replies/#",))
    assert t.parse_request("outpost/d1/models/mlp/infer") == RequestTarget("mlp")
    assert t.parse_request("outpost/d1/models/mlp/versions/2/infer") == RequestTarget("mlp", "2")
    for other in ("outpost/d1/models/mlp", "outpost/d2/models/mlp/infer", "outpost/d1/models//infer",
                  "outpost/d1/models/mlp/versions//infer", "outpost/d1/status", "outpost/d1x/models/a/infer"):
        assert t.parse_request(other) is None, other


@pytest.mark.parametrize(("topic", "allowed"), [
    ("outpost/d1/replies/client-1", True),
    ("outpost/d1/replies/a/b/c", True),
    ("outpost/d2/replies/client-1", False),  # another device
    ("outpost/d1/models/mlp/infer", False),  # our own request topic: a loop
    ("outpost/d1/status", False),  # presence
    ("factory/plc/commands", False),  # a control topic
    ("outpost/d1/replies/+", False),  # wildcards cannot be published on
    ("$SYS/broker", False),
    ("", False),
])
def test_reply_topic_rule(topic: str, allowed: bool) -> None:
    t = Topics("outpost/d1", ("outpost/d1/replies/#",))
    assert (t.reply_refusal(topic) is None) is allowed


def test_reply_rule_never_allows_own_topics_even_with_a_wide_prefix() -> None:
    t = Topics("outpost/d1", ("#",))
    assert t.reply_refusal("anything/else") is None
    assert t.reply_refusal("outpost/d1/models/m/infer") is not None
    assert t.reply_refusal("outpost/d1/telemetry") is not None


# ----------------------------------------------------------------------------- duplicates, outbox, backoff


def test_duplicate_window_by_age_and_count() -> None:
    now = [0.0]
    cache = DuplicateCache(window_s=10.0, max_entries=3, clock=lambda: now[0])
    assert cache.first_time(("r", b"1"))
    assert not cache.first_time(("r", b"1"))
    assert cache.first_time(("other", b"1"))  # the same id from another requester is another request
    now[0] = 11.0
    assert cache.first_time(("r", b"1"))  # outside the window
    for i in range(2, 12):
        cache.first_time(("r", str(i).encode()))
    assert len(cache) == 3
    assert cache.duplicates == 1


def test_outbox_drops_the_oldest_and_counts() -> None:
    box = Outbox(3)
    for i in range(5):
        box.put(Outgoing("t", str(i).encode(), 1))
    assert len(box) == 3 and box.dropped == 2
    first = box.pop()
    assert first is not None and first.payload == b"2"
    box.put_front(first)
    assert [m.payload for m in iter(box.pop, None)] == [b"2", b"3", b"4"]


def test_backoff_grows_with_jitter_and_resets() -> None:
    draws: list[tuple[float, float]] = []

    def uniform(lo: float, hi: float) -> float:
        draws.append((lo, hi))
        return hi

    b = Backoff(0.5, 4.0, uniform)
    delays = [b.next_delay_s() for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(lo == 0.5 for lo, _ in draws)
    b.reset()
    assert b.next_delay_s() == 0.5
    real = Backoff(0.5, 30.0)
    values = {round(real.next_delay_s(), 6) for _ in range(20)}
    assert len(values) > 10 and all(0.5 <= v <= 30.0 for v in values)


# ----------------------------------------------------------------------------- framing


def test_binary_framing_by_property_and_by_separator() -> None:
    data = np.arange(6, dtype=np.float32).reshape(1, 6)
    header = (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,6],'
              b'"parameters":{"binary_data_size":24}}]}')
    by_prop = decode(header + data.tobytes(), {HEADER_LENGTH_PROPERTY: str(len(header))})
    by_nul = decode(header + b"\0" + data.tobytes(), {})
    for req in (by_prop, by_nul):
        np.testing.assert_array_equal(req.inputs[0].data, data)
    assert split_payload(b'{"a":1}', {}) == (b'{"a":1}', None)
    with pytest.raises(InvalidRequest):
        split_payload(b"\0abc", {})


def test_json_addressing_and_salvage() -> None:
    addr = json_addressing({"reply_topic": "p/replies/x", "correlation_id": 7})
    assert addr == Addressing("p/replies/x", b"7", "7", False)
    assert json_addressing({}) is None
    with pytest.raises(InvalidRequest):
        json_addressing({"reply_topic": 5})
    bad = b'{"parameters":{"reply_topic":"p/replies/x","correlation_id":"c"},"inputs":"nope"}'
    salvaged = salvage_addressing(bad, {})
    assert salvaged is not None and salvaged.correlation_id == "c"
    assert salvage_addressing(b"not json", {}) is None


def test_error_payload_is_the_http_error_plus_status() -> None:
    doc = parse_json(error_payload(Addressing("t", b"c", "c"), ModelNotFound("nope")))
    assert doc == {"error": "model 'nope' is not served here", "status": 404, "correlation_id": "c"}
    busy = parse_json(error_payload(None, Overloaded("m", 10, 10, 0.5)))
    assert busy["status"] == 503 and busy["retry_after_s"] == 0.5
