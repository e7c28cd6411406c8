"""The daemon's systemd supervision over a real NOTIFY_SOCKET: STATUS lines follow the update steps and errors,
and the watchdog stops pinging when the sync coordinator is wedged or has died (systemd then restarts it)."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
from collections.abc import Iterator

import pytest

from agent.daemon.agent import register_secrets
from agent.daemon.config import parse
from agent.daemon.state import AgentState, BundleRecord, Pending
from agent.daemon.supervision import ObservedStore, ServiceStatus
from agent.dataplane import DataPlane
from runtime.journal import configure_logging
from runtime.sdnotify import Notifier, Watchdog
from tests.systemd.notify_socket import NotifySocket


@pytest.fixture
def status(notify_socket: NotifySocket, tmp_path: pathlib.Path) -> Iterator[ServiceStatus]:
    config = parse({"agent": {"trust": ["k.pub"]}, "sync": {"long_poll_s": 25.0, "retry_max_s": 60.0}}, tmp_path)
    s = ServiceStatus(Notifier(notify_socket.path), DataPlane(drain_timeout_s=1.0), AgentState(), config)
    yield s
    s.notifier.close()


def wait_status(ns: NotifySocket, text: str, timeout_s: float = 5) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for m in ns.with_key("STATUS"):
            if text in m.fields["STATUS"]:
                return m.fields["STATUS"]
        time.sleep(0.02)
    raise AssertionError(f"no STATUS with {text!r}: {[m.fields for m in ns.with_key('STATUS')]}")


def test_status_lines_follow_steps_and_errors(notify_socket: NotifySocket, status: ServiceStatus,
                                              tmp_path: pathlib.Path) -> None:
    store = ObservedStore(tmp_path / "state", status.step)
    status.sync_started()
    assert wait_status(notify_socket, "syncing with the fleet") == "serving 0 model(s); syncing with the fleet"
    rec = BundleRecord("demo")
    rec.pending = Pending("2.0.0", "d" * 64, "a" * 64, "assigned", time.time())
    store.save(rec)
    store.step(rec, "prechecked")  # downloading: guarded by the download's own stall timeouts
    assert status.heartbeat.max_age_s >= 3600
    store.step(rec, "downloaded")
    assert wait_status(notify_socket, "at step downloaded") == \
        "serving 0 model(s); installing demo@2.0.0 at step downloaded"
    # while an update step runs, the sync heartbeat allows an engine build's time
    assert 600 <= status.heartbeat.max_age_s < 3600
    rec.pending = None
    rec.last_failure = {"ref": "demo@2.0.0", "step": "gate", "reason": "p95 over the SLO"}
    store.save(rec)
    assert "last error: demo@2.0.0 refused at gate: p95 over the SLO" in wait_status(notify_socket, "last error")
    assert status.heartbeat.max_age_s == status.idle_limit_s
    sent = len(notify_socket.with_key("STATUS"))
    status.refresh()  # nothing changed: nothing sent
    time.sleep(0.1)
    assert len(notify_socket.with_key("STATUS")) == sent
    status.sync_ended(ConnectionError("fleet unreachable"))
    assert "last error: sync: fleet unreachable" in wait_status(notify_socket, "sync: fleet unreachable")
    # the idle limit is larger than the long-poll wait (plus the largest backoff)
    assert status.idle_limit_s > 25.0 + 60.0


def test_watchdog_stops_pinging_when_the_sync_coordinator_is_wedged_or_dead(
        notify_socket: NotifySocket, status: ServiceStatus) -> None:

    async def main() -> None:
        wedged = asyncio.Event()
        release = asyncio.Event()

        async def sync_loop() -> None:  # polls every 50 ms until "wedged", then hangs inside a step
            while True:
                status.sync_started()
                if wedged.is_set():
                    await release.wait()
                    raise RuntimeError("sync loop bug")
                await asyncio.sleep(0.05)
                status.sync_ended(None)

        status.idle_limit_s = status.heartbeat.max_age_s = 0.5
        status.sync_task = asyncio.create_task(sync_loop())
        dog = Watchdog(status.notifier, 0.1, [status.runners_check, status.sync_check])
        task = asyncio.create_task(dog.run())
        try:
            await asyncio.sleep(0.6)
            healthy = dog.state.pings
            assert healthy >= 3 and dog.state.withheld == 0
            wedged.set()
            await asyncio.sleep(1.2)
            assert dog.state.withheld >= 3
            assert "sync coordinator has not progressed" in (dog.state.last_reason or "")
            stalled = dog.state.pings
            release.set()  # the step fails with a bug: the task ends, the check names it
            await asyncio.sleep(0.3)
            assert "sync coordinator stopped: RuntimeError: sync loop bug" in (dog.state.last_reason or "")
            assert dog.state.pings == stalled
        finally:
            task.cancel()
            status.sync_task.cancel()
            await asyncio.gather(task, status.sync_task, return_exceptions=True)

    asyncio.run(main())
    pings = notify_socket.with_key("WATCHDOG")
    assert len(pings) >= 3
    lines = [m.fields["STATUS"] for m in notify_socket.with_key("STATUS")]
    assert any(s.startswith("unhealthy: sync coordinator has not progressed") for s in lines), lines


def test_the_agents_secrets_are_masked_once_loaded(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """run_agent registers the device credential, the HTTP token and the MQTT password before anything logs."""
    config = parse({"agent": {"trust": ["k.pub"]}, "server": {"token": "http-token-5d6e7f"},
                    "mqtt": {"password": "mqtt-pass-8a9b0c"}}, tmp_path)
    level = logging.getLogger().level
    handler = configure_logging(logging.INFO, environ={})
    try:
        register_secrets(config, "dev-credential-1a2b3c4d")
        logging.getLogger("agent.test").warning("fleet said no to %s / %s / %s", "dev-credential-1a2b3c4d",
                                                "http-token-5d6e7f", "mqtt-pass-8a9b0c")
        err = capsys.readouterr().err
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    assert "fleet said no to *** / *** / ***" in err, err
