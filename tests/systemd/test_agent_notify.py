"""A real `outpost agent run` under a real NOTIFY_SOCKET and a journal stand-in, with a real fleet on loopback.

What systemd would see: READY=1 only once the last-known-good version serves
(the update to a new version runs after it), STATUS= lines naming what serves
and which update step runs, WATCHDOG=1 pings, STOPPING=1 on SIGTERM, exit 0,
and the last report (counting the requests answered before the stop) at the
fleet. What journald would get: the update steps as entries with MODEL,
VERSION and STEP fields, and at -vv not one line with the device credential.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import pytest

from tests.agent_daemon.conftest import Version, make_version
from tests.agent_daemon.harness import REPO, Agent, Fleet, running
from tests.models.make_models import mlp
from tests.systemd.notify_socket import Message, NotifySocket
from tests.systemd.slow_model import slow_model
from tests.systemd.test_graceful_stop import _in_flight, _post, _status
from tests.systemd.test_journal import parse_entry

DRAIN_S = 20.0
# The CLI as systemd starts it, with its journal handler pointed at the stand-in socket
# (the product's default is /run/systemd/journal/socket).
CHILD = """
import logging, sys
import runtime.journal as j
_configure = j.configure_logging
j.configure_logging = lambda level=logging.WARNING, *a, **k: _configure(level, journal_socket=sys.argv[1])
from cli.main import cli
cli(["-vv", "agent", "run", "--config", sys.argv[2], "--loop", "asyncio"])
"""


class JournalCollector:
    """journald's native socket, stood in for: every entry is parsed and kept (drained so the sender never blocks)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="jrn-", dir="/tmp")
        self.path = os.path.join(self.dir, "socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.settimeout(0.05)
        self.entries: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 1)
            except TimeoutError:
                continue
            except OSError:
                return
            if fds:
                with os.fdopen(fds[0], "rb") as f:
                    f.seek(0)
                    data = f.read()
            self.entries.append(parse_entry(data))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def journal() -> Iterator[JournalCollector]:
    j = JournalCollector()
    yield j
    j.close()


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[pathlib.Path, pathlib.Path]
                 ) -> tuple[Version, Version]:
    root = tmp_path_factory.mktemp("notify-versions")
    return (make_version(root, keypair[0], "demo", "1.0.0", mlp(seed=1), release=1),
            make_version(root, keypair[0], "demo", "2.0.0", mlp(seed=2), release=2))


def statuses(ns: NotifySocket) -> list[str]:
    return [m.fields["STATUS"] for m in ns.with_key("STATUS")]


def wait_status(ns: NotifySocket, text: str, timeout_s: float = 90) -> Message:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for m in ns.with_key("STATUS"):
            if text in m.fields["STATUS"]:
                return m
        time.sleep(0.05)
    raise AssertionError(f"no STATUS with {text!r} within {timeout_s} s: {statuses(ns)}")


def fleet_model(fleet: Fleet, device_id: str, name: str = "demo") -> dict[str, Any]:
    state = fleet.api("GET", f"/api/v1/devices/{device_id}").get("state") or {}
    return dict({m["name"]: m for m in state.get("models", [])}.get(name, {}))


def test_agent_speaks_the_notify_protocol_and_stops_cleanly(
        tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path], two_versions: tuple[Version, Version],
        notify_socket: NotifySocket, journal: JournalCollector) -> None:
    v1, v2 = two_versions
    fleet = Fleet(tmp_path / "fleet", keypair[1])
    fleet.start()
    agent = Agent(tmp_path / "agent", fleet, keypair[1], sync__report_period_s=3600.0)
    with running(fleet, agent):
        for v in (v1, v2):
            fleet.push(v.archive)
        fleet.assign(agent.device_id, v1.ref)

        # First start, nothing installed: READY at once (serving none), then the install shows step by step.
        first = NotifySocket()
        try:
            agent.start(env={"NOTIFY_SOCKET": first.path})
            (ready,) = first.wait_for("READY", "1")
            assert "serving 0 model(s)" in ready.fields["STATUS"]
            wait_status(first, "serving 1 model(s): demo@1.0.0")
            installing = [s for s in statuses(first) if "installing demo@1.0.0 at step" in s]
            assert any("at step downloaded" in s for s in installing), statuses(first)
            assert agent.stop() == 0
            first.wait_for("STOPPING", "1", timeout_s=5)
        finally:
            first.close()

        # Second start, v2 assigned meanwhile: READY only once the last-known-good v1 serves; v2 comes after.
        fleet.assign(agent.device_id, v2.ref)
        credential = json.loads(agent.credential.read_text())["credential"]
        ns = notify_socket
        stderr_path = tmp_path / "stderr"
        with open(stderr_path, "w") as err:
            st = os.fstat(err.fileno())
            env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "4000000",
                   "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
            proc = subprocess.Popen([sys.executable, "-c", CHILD, journal.path, str(agent.config)], cwd=REPO,
                                    env=env, stdout=err, stderr=err)
        try:
            (ready,) = ns.wait_for("READY", "1", timeout_s=90)
            assert "demo@1.0.0" in ready.fields["STATUS"], ready.fields
            before_ready = [m for m in ns.snapshot() if m.at < ready.at]
            assert not any("demo@2.0.0" in m.fields.get("STATUS", "") for m in before_ready), before_ready
            installed = wait_status(ns, "serving 1 model(s): demo@2.0.0")
            steps = [m.fields["STATUS"] for m in ns.with_key("STATUS") if ready.at < m.at < installed.at]
            assert any("installing demo@2.0.0 at step built" in s for s in steps), steps
            # the watchdog pings every 2 s (half of WATCHDOG_USEC) while every self-check passes
            pings = ns.wait_for("WATCHDOG", "1", count=3, timeout_s=30)
            assert all(p.at > ready.at for p in pings)

            # The fleet saw the start-up report (v1, idle); requests now, then SIGTERM.
            deadline = time.monotonic() + 30
            while fleet_model(fleet, agent.device_id).get("active") != "1.0.0":
                assert time.monotonic() < deadline, fleet.api("GET", f"/api/v1/devices/{agent.device_id}")
                time.sleep(0.2)
            x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
            for _ in range(7):
                assert agent.infer("demo", x)[0] == "2.0.0"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output = stderr_path.read_text()
        stopping = ns.wait_for("STOPPING", "1", timeout_s=5)
        assert stopping[0].at > ready.at
        assert any(s.startswith("stopping: sending the last report") for s in statuses(ns)), statuses(ns)
        # the last report, sent after the drain: v2 active, the 7 requests counted
        demo = fleet_model(fleet, agent.device_id)
        assert demo.get("active") == "2.0.0" and demo.get("last_known_good") == "1.0.0", demo
        assert demo["stats"]["requests"] == 7, demo

    # The journal: native entries (nothing but the CLI's own lines on stderr), update steps with their fields.
    entries = list(journal.entries)
    assert entries, output
    tagged = {(e.get("MODEL"), e.get("VERSION"), e.get("STEP")) for e in entries}
    for step in ("downloaded", "installed", "built", "gated", "switched"):
        assert ("demo", "2.0.0", step) in tagged, sorted(map(str, tagged))
    assert ("demo", "2.0.0", "commit") in tagged  # the "switched" event of the update
    assert any(e["PRIORITY"] == "7" for e in entries), "-vv logs debug lines too"
    for e in entries:
        assert credential not in json.dumps(e), e
    assert credential not in output
    assert len(credential) >= 16


def test_agent_sigterm_with_50_requests_in_flight(tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path],
                                                  notify_socket: NotifySocket) -> None:
    """The agent's drain: STOPPING, not ready, 503 for new requests, all 50 answered, the last report counts them."""
    slow = make_version(tmp_path, keypair[0], "slow", "1.0.0",
                        onnx.load(str(slow_model(tmp_path / "slow-src.onnx", iterations=300_000))))
    fleet = Fleet(tmp_path / "fleet", keypair[1])
    fleet.start()
    agent = Agent(tmp_path / "agent", fleet, keypair[1], sync__report_period_s=3600.0,
                  server__drain_timeout_s=DRAIN_S)
    with running(fleet, agent):
        fleet.push(slow.archive)
        fleet.assign(agent.device_id, slow.ref)
        proc = agent.start(env={"NOTIFY_SOCKET": notify_socket.path})
        wait_status(notify_socket, "serving 1 model(s): slow@1.0.0")
        body = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.1] * 16}]}
        infer = f"{agent.url}/v2/models/slow/infer"
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            futures = [pool.submit(_post, infer, body) for _ in range(50)]
            deadline = time.monotonic() + 30
            while _in_flight(agent.url) < 50:
                assert time.monotonic() < deadline, f"only {_in_flight(agent.url)} of 50 requests in flight"
                assert not any(f.done() for f in futures), "a request finished before all 50 were in flight"
                time.sleep(0.01)
            t_term = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            (stopping,) = notify_socket.wait_for("STOPPING", "1", timeout_s=10)
            assert stopping.fields["STATUS"] == "draining 50 in-flight request(s)", stopping.fields
            assert _status(f"{agent.url}/v2/health/ready") == 503
            late_status, _ = _post(infer, body)
            assert late_status == 503
            assert not all(f.done() for f in futures), "the drain ended before the checks above ran"
            results = [f.result(timeout=DRAIN_S + 30) for f in futures]
        rc = agent.stop()
        took = time.monotonic() - t_term
        assert [s for s, _ in results] == [200] * 50
        assert rc == 0, proc.output
        assert took < DRAIN_S + 5, took  # the drain plus the last report, inside TimeoutStopSec=
        assert "outpost agent: stopped\n" in proc.output  # not "(some requests were cut off)"
        model = fleet_model(fleet, agent.device_id, "slow")
        assert model["stats"]["requests"] == 50, model
