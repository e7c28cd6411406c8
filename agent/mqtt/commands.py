"""`outpost serve --mqtt URL ...`: the options and the transport `serve` runs.

`agent.commands.serve` takes transports (a callable from the DataPlane to an
async context manager, started after HTTP and stopped before it); this module
turns the `--mqtt*` options into one, so `serve_command` only gains a
decorator, a parameter and an `append`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from agent.dataplane import DataPlane

from .settings import MqttSettings

if TYPE_CHECKING:
    from .frontend import MqttFrontEnd

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS: list[Callable[[F], F]] = [
    click.option("--mqtt", "mqtt_url", metavar="URL",
                 help="Also answer inference requests over MQTT: mqtt://host[:port] or mqtts://host[:port]."),
    click.option("--mqtt-prefix", metavar="PREFIX", help="Topic prefix (default: outpost/DEVICE_ID)."),
    click.option("--mqtt-username", envvar="OUTPOST_MQTT_USERNAME", help="Broker user name."),
    click.option("--mqtt-password", envvar="OUTPOST_MQTT_PASSWORD",
                 help="Broker password (prefer the env OUTPOST_MQTT_PASSWORD: argv is visible to other users)."),
    click.option("--mqtt-ca", type=click.Path(exists=True, dir_okay=False), help="CA bundle for mqtts:// (PEM)."),
    click.option("--mqtt-cert", type=click.Path(exists=True, dir_okay=False), help="Client certificate (PEM)."),
    click.option("--mqtt-key", type=click.Path(exists=True, dir_okay=False), help="Client certificate key (PEM)."),
    click.option("--mqtt-client-id", help="MQTT client id (default: outpost-DEVICE_ID)."),
    click.option("--mqtt-qos", type=click.IntRange(0, 2), default=1, show_default=True,
                 help="QoS of subscriptions and replies."),
    click.option("--mqtt-protocol", type=click.Choice(["5", "3.1.1"]), default="5", show_default=True),
    click.option("--mqtt-reply-prefix", "mqtt_reply_prefixes", multiple=True, metavar="FILTER",
                 help="Topic filter a Response Topic must match (repeatable; default PREFIX/replies/#)."),
    click.option("--mqtt-telemetry-s", type=click.FloatRange(0), default=0.0, show_default=True,
                 help="Publish health to PREFIX/telemetry every this many seconds (0: off)."),
    click.option("--device-id", help="This device's id in topics (default: the host name)."),
]


def mqtt_options(f: F) -> F:
    """Add the --mqtt* options; the command receives them as one `mqtt_transport` argument."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        url = kwargs.pop("mqtt_url")
        given = {
            "prefix": kwargs.pop("mqtt_prefix"), "username": kwargs.pop("mqtt_username"),
            "password": kwargs.pop("mqtt_password"), "ca_path": kwargs.pop("mqtt_ca"),
            "cert_path": kwargs.pop("mqtt_cert"), "key_path": kwargs.pop("mqtt_key"),
            "client_id": kwargs.pop("mqtt_client_id"), "qos": kwargs.pop("mqtt_qos"),
            "protocol": kwargs.pop("mqtt_protocol"), "reply_prefixes": kwargs.pop("mqtt_reply_prefixes") or None,
            "telemetry_interval_s": kwargs.pop("mqtt_telemetry_s"), "device_id": kwargs.pop("device_id"),
        }
        kwargs["mqtt_transport"] = mqtt_transport(MqttSettings.from_url(url, **given)) if url else None
        return f(*args, **kwargs)

    decorated: Any = wrapper
    for option in reversed(_OPTIONS):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


def mqtt_transport(settings: MqttSettings) -> Callable[[DataPlane], contextlib.AbstractAsyncContextManager[Any]]:
    """A transport for `agent.commands.serve`: the MQTT front end, its metrics and its status lines."""

    from .frontend import MqttFrontEnd  # paho-mqtt is loaded only when --mqtt is given
    from .metrics import MqttCollector

    @contextlib.asynccontextmanager
    async def run(dataplane: DataPlane) -> AsyncIterator[MqttFrontEnd]:
        front = MqttFrontEnd(dataplane, settings)
        collector = MqttCollector(front.status)
        dataplane.metrics.registry.register(collector)
        await front.start()
        watcher = asyncio.create_task(_echo_state_changes(front), name="mqtt-status")
        try:
            yield front
        finally:
            watcher.cancel()
            await front.stop()
            dataplane.metrics.registry.unregister(collector)

    return run


async def _echo_state_changes(front: MqttFrontEnd, every_s: float = 0.2) -> None:
    """`outpost serve`'s status output: one line per MQTT state change, never per retry."""
    last: tuple[str, str | None] | None = None
    timed = None
    while True:
        if front.probe.last is not timed and front.probe.last is not None:  # [probe]
            timed = front.probe.last
            slow = " (slow: set `set_tcp_nodelay true` on the broker)" if timed.median_ms > front.probe.slow_ms else ""
            click.echo(f"outpost serve: MQTT broker round trip {timed.median_ms:.2f} ms{slow}", err=True)
        c = front.connection.status()
        now = (c.state, c.last_error)
        if now != last:
            detail = f": {c.last_error}" if c.last_error else ""
            click.echo(f"outpost serve: MQTT {c.broker} as {c.client_id}: {c.state}{detail}", err=True)
            if c.state == "connected":
                click.echo(f"outpost serve: MQTT requests on {front.topics.prefix}/models/MODEL/infer", err=True)
            last = now
        await asyncio.sleep(every_s)
