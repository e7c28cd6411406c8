"""The daemon assembled: data plane + HTTP (+ MQTT) + sync coordinator + reporter, over one state directory.

`run_agent` is what `outpost agent run` calls; tests and `outpost up` call it
the same way with their own config and stop event. It holds the state
directory's lock for its whole life (a second agent, or `outpost agent
import`, on the same directory is refused), loads what is installed before
listening (each bundle on its own: one that fails to load is reported and
the others serve), then serves through `agent.commands.serve` with the
coordinator and reporter as one more transport, so start, drain and stop are
the same as `outpost serve`'s. That transport is entered first so it exits
last: after MQTT unsubscribed it waits for the drain, then sends the last
report while the models (and their metrics) are still loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import filelock

import bundle
from engines import HardwareInfo, Probe, SystemProbe
from runtime.journal import register_secret
from runtime.sdnotify import Notifier
from runtime.timeouts import timeout

from .. import telemetry
from ..commands import LOAD_ALLOWANCE_S, Lifecycle, Transport, serve
from ..credentials import load_credential
from ..dataplane import DataPlane, _version
from ..download import BlobStore
from ..errors import ConfigError
from ..fleet_client import FleetClient
from ..fleet_client import Transport as HttpTransport
from ..reporter import Reporter
from ..runner import EngineSource
from .config import AgentConfig
from .install import Installer
from .report import ReportBuilder
from .state import AgentState, BundleRecord, StateStore
from .supervision import ObservedStore, ServiceStatus
from .sync import SyncCoordinator
from .updater import Updater

if TYPE_CHECKING:
    from ..mqtt.nudge import NudgeListener

log = logging.getLogger(__name__)
LOCK_NAME = "agent.lock"
#: the last report's deadline at shutdown (after the drain; TimeoutStopSec= covers both)
FINAL_FLUSH_S = 5.0


class ObservedSync(SyncCoordinator):
    """The sync coordinator, with each poll reported to the service status (its heartbeat and STATUS= line)."""

    def __init__(self, status: ServiceStatus, *args: Any, **kwargs: Any) -> None:
        self.service_status = status
        super().__init__(*args, **kwargs)

    async def step(self) -> None:
        self.service_status.sync_started()
        error: BaseException | None = None
        try:
            await super().step()
        except Exception as e:
            error = e
            raise
        finally:
            self.service_status.sync_ended(error)


def register_secrets(config: AgentConfig, secret: str) -> None:
    """Every secret the agent holds is masked in every log line from here on (runtime.journal)."""
    for value in (secret, config.http.token, config.mqtt.password):
        register_secret(value)


class AgentBusy(ConfigError):
    """Another agent process owns this state directory."""


@contextlib.contextmanager
def state_lock(config: AgentConfig) -> Any:
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = filelock.FileLock(str(config.state_dir / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise AgentBusy(f"another outpost agent is running on {config.state_dir} (its lock is held)") from None
    try:
        yield
    finally:
        lock.release()


@dataclass
class AgentParts:
    """Everything one agent holds; built by `assemble`, shared by `run_agent` and `outpost agent import`."""

    config: AgentConfig
    store: StateStore
    state: AgentState
    dataplane: DataPlane
    installer: Installer
    blobs: BlobStore
    updater: Updater
    hardware: HardwareInfo


def assemble(config: AgentConfig, probe: Probe | None = None,
             on_record: Callable[[BundleRecord], None] | None = None) -> AgentParts:
    """`on_record`: told about every update step as it is written (the daemon's STATUS= line)."""
    probe = probe or SystemProbe()
    hardware = probe.detect()
    store = ObservedStore(config.state_dir, on_record)
    state = store.load_agent()
    dataplane = DataPlane(engines=EngineSource(cache_dir=config.engine_cache_dir, probe=probe),
                          drain_timeout_s=config.http.drain_timeout_s)
    installer = Installer(config.installs_dir, config.staging_dir, bundle.anchors([str(p) for p in config.trust]))
    blobs = BlobStore(config.store_dir)
    blobs.ensure()
    updater = Updater(config, store, installer, dataplane, blobs, hardware, state)
    return AgentParts(config, store, state, dataplane, installer, blobs, updater, hardware)


def _hardware_doc(hw: HardwareInfo) -> dict[str, Any]:
    doc: dict[str, Any] = {"cpu": hw.cpu_name[:200], "cpu_count": hw.cpu_count, "architecture": hw.arch,
                           "memory_bytes": hw.memory_total_bytes, "onnxruntime": hw.onnxruntime_version}
    if hw.gpu is not None:
        doc.update(gpu_name=hw.gpu.name[:200], compute_capability=hw.gpu.compute_capability,
                   driver=hw.driver_version, cuda=hw.cuda_version, tensorrt=hw.tensorrt_version)
    return {k: v for k, v in doc.items() if v is not None}


def record_serving(parts: AgentParts) -> None:
    parts.state.serving = {sm.name: {"version": sm.version, "backend": sm.runner.backend,
                                     "fallbacks": [f"{f.backend}: {f.reason}" for f in sm.runner.fallbacks]}
                           for sm in parts.dataplane.active_models()}
    parts.store.save_agent(parts.state)


def _mqtt_transport(config: AgentConfig, device_id: str) -> tuple[Transport, ...]:
    m = config.mqtt
    if not m.url:
        return ()
    from ..mqtt.commands import mqtt_transport
    from ..mqtt.settings import MqttSettings

    settings = MqttSettings.from_url(
        m.url, prefix=m.prefix or None, username=m.username or None, password=m.password or None,
        ca_path=m.ca_file or None, cert_path=m.cert_file or None, key_path=m.key_file or None, qos=m.qos,
        telemetry_interval_s=m.telemetry_s, device_id=device_id)
    return (mqtt_transport(settings),)


def _nudge_listener(config: AgentConfig, device_id: str, on_nudge: Callable[[int], None]) -> NudgeListener | None:
    """With MQTT configured, the fleet's nudges wake the sync coordinator at once."""
    m = config.mqtt
    if not m.url:
        return None
    from ..mqtt.nudge import NudgeListener
    from ..mqtt.settings import MqttSettings

    settings = MqttSettings.from_url(
        m.url, username=m.username or None, password=m.password or None, ca_path=m.ca_file or None,
        cert_path=m.cert_file or None, key_path=m.key_file or None, qos=1, device_id=device_id)
    return NudgeListener(settings, device_id, on_nudge)


async def run_agent(config: AgentConfig, *, stop: asyncio.Event, lifecycle: Lifecycle | None = None,
                    transport: HttpTransport | None = None, probe: Probe | None = None,
                    transports: tuple[Transport, ...] = ()) -> bool:
    """Run until `stop` is set; True if every in-flight request finished at shutdown.

    Under systemd (`NOTIFY_SOCKET`): READY=1 once the installed (last-known-good)
    versions serve, before the first sync (engines for new versions build
    afterwards); STATUS= on every change of what serves or what the agent does;
    WATCHDOG=1 only while the loop, the runners and the sync coordinator pass
    their checks; STOPPING=1 on SIGTERM, then drain, then the last report.
    """
    started = time.monotonic()
    notifier = Notifier.from_env()
    with state_lock(config):
        credential = load_credential(config.credential)
        register_secrets(config, credential.secret)
        try:
            fleet_keys = [config.fleet_key.read_bytes()]
        except OSError as e:
            raise ConfigError(f"trusted fleet key {config.fleet_key} is not readable ({e.strerror or e}); "
                              "`outpost agent enroll` writes it beside the credential") from None
        status_box: list[ServiceStatus] = []
        parts = await asyncio.to_thread(assemble, config, probe,
                                        lambda rec: status_box[0].step(rec) if status_box else None)
        status = ServiceStatus(notifier, parts.dataplane, parts.state, config)
        status_box.append(status)
        parts.state.pid, parts.state.started_at = os.getpid(), time.time()
        parts.store.save_agent(parts.state)
        client = FleetClient(config.fleet_url or credential.fleet_url, credential.device_id, credential.secret,
                             transport, ca_file=config.ca_file)
        sampler = telemetry.Sampler(config.state_dir)
        hw = parts.hardware
        builder = ReportBuilder(parts.dataplane, parts.store, parts.state, _version(), _hardware_doc(hw),
                                sampler.sample, {"onnxruntime": hw.onnxruntime_version, "tensorrt": hw.tensorrt_version,
                                                 "cuda": hw.cuda_version, "driver": hw.driver_version,
                                                 "l4t": hw.l4t_release})

        def switched() -> None:
            record_serving(parts)
            status.refresh()

        parts.updater.on_switch = switched
        reporter = Reporter(client, builder.build, config.sync.report_period_s, config.sync.report_buffer)
        sync = ObservedSync(status, config, client, parts.updater, parts.store, parts.state, fleet_keys, parts.blobs)
        installed = [rec.name for rec in parts.store.all() if rec.active is not None]
        if installed:
            # Loading (maybe building) the installed versions can outlast TimeoutStartSec.
            notifier.extend_timeout(LOAD_ALLOWANCE_S * len(installed),
                                    f"loading {len(installed)} installed bundle(s): {', '.join(installed)}")
        await parts.updater.boot()
        record_serving(parts)

        @contextlib.asynccontextmanager
        async def background(_: DataPlane) -> AsyncIterator[None]:
            async def stable() -> None:
                await asyncio.sleep(config.update.stable_after_s)
                parts.updater.mark_stable()

            nudges = _nudge_listener(config, credential.device_id, sync.nudge)
            if nudges is not None:
                nudges.start()
            status.sync_task = asyncio.create_task(sync.run(), name="agent-sync")
            tasks = [status.sync_task, asyncio.create_task(reporter.run(), name="agent-reports"),
                     asyncio.create_task(stable(), name="agent-stable")]
            try:
                yield
            finally:
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
                if nudges is not None:
                    await asyncio.to_thread(nudges.stop)
                await last_report()

        async def last_report() -> None:
            """After the drain, before the models unload: the last report counts every request answered."""
            if parts.dataplane.draining:
                await parts.dataplane.wait_idle(config.http.drain_timeout_s)
            notifier.status(f"stopping: sending the last report ({reporter.buffered + 1} queued)")
            reporter.collect()
            try:
                async with timeout(FINAL_FLUSH_S):
                    sent = await reporter.flush()
            except Exception as e:
                log.warning("the last report could not be sent (%s); %d report(s) lost", e, reporter.buffered)
            else:
                if reporter.buffered:
                    log.warning("sent %d report(s) at shutdown; %d could not be sent", sent, reporter.buffered)
                else:
                    log.info("sent the last %d report(s) at shutdown", sent)
            await client.aclose()

        mqtt = _mqtt_transport(config, credential.device_id)
        try:
            return await serve([], config.model_config(), config.server_config(),
                               (background, *transports, *mqtt),
                               stop=stop, lifecycle=lifecycle, dataplane=parts.dataplane, started_at=started,
                               watchdog_checks=[status.runners_check, status.sync_check])
        finally:
            notifier.close()
            parts.state.pid = None
            parts.store.save_agent(parts.state)
