"""`outpost serve` and `outpost fleet serve` as systemd runs them: a real NOTIFY_SOCKET, a watchdog, and
SIGTERM with 50 requests in flight (all answered, not ready and 503 for new ones meanwhile, exit 0)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import bundle
from tests.conftest import MakeBundle
from tests.systemd.conftest import ROOT
from tests.systemd.notify_socket import NotifySocket
from tests.systemd.slow_model import slow_model

DRAIN_TIMEOUT_S = 15.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], notify: NotifySocket, tmp_path: pathlib.Path, watchdog_usec: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OUTPOST_ENGINE_CACHE": str(tmp_path / "engines"),
           "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(watchdog_usec)}
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _post(url: str, doc: dict[str, Any], timeout_s: float = 60.0) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def _in_flight(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(r"^outpost_in_flight_requests\{[^}]*\} (\S+)$", text, re.M))


def test_sigterm_with_50_requests_in_flight(make_bundle: MakeBundle, keypair: tuple[pathlib.Path, pathlib.Path],
                                            tmp_path: pathlib.Path, notify_socket: NotifySocket) -> None:
    model = slow_model(tmp_path / "slow.onnx", iterations=1_000_000)  # about 1 s per batch on one thread
    src = tmp_path / "bundle"
    bundle.build([model], src, bundle.BuildOptions(name="slow", version="1.0.0", max_batch_size=64))
    bundle.sign_directory(src, keypair[0])
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _spawn(["serve", str(src), "--trust", str(keypair[1]), "--port", str(port), "--threads", "1",
                   "--drain-timeout-s", str(DRAIN_TIMEOUT_S)], notify_socket, tmp_path, watchdog_usec=1_000_000)
    try:
        (ready,) = notify_socket.wait_for("READY", "1", timeout_s=120)
        assert ready.fields["STATUS"].startswith(f"serving 1 model(s) on {base}: slow@1.0.0")
        (extend,) = notify_socket.with_key("EXTEND_TIMEOUT_USEC")  # start-up time for the engine build
        assert extend.fields == {"EXTEND_TIMEOUT_USEC": "600000000", "STATUS": "loading slow@1.0.0"}
        assert extend.at <= ready.at
        assert _status(f"{base}/v2/health/ready") == 200
        notify_socket.wait_for("WATCHDOG", "1", count=3, timeout_s=10)  # every 0.5 s

        body = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.1] * 16}]}
        infer = f"{base}/v2/models/slow/infer"
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            futures = [pool.submit(_post, infer, body) for _ in range(50)]
            deadline = time.monotonic() + 30
            while _in_flight(base) < 50:
                assert time.monotonic() < deadline, f"only {_in_flight(base)} of 50 requests in flight"
                assert not any(f.done() for f in futures), "a request finished before all 50 were in flight"
                time.sleep(0.01)
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            (stopping,) = notify_socket.wait_for("STOPPING", "1", timeout_s=10)
            assert re.fullmatch(r"draining (\d+) in-flight request\(s\)", stopping.fields["STATUS"])
            # While draining: not ready, and a new request is turned away with 503.
            assert _status(f"{base}/v2/health/ready") == 503
            late_status, late_body = _post(infer, body)
            assert late_status == 503 and "shutting down" in late_body["error"]
            assert not all(f.done() for f in futures), "the drain ended before the checks above ran"
            results = [f.result(timeout=DRAIN_TIMEOUT_S + 30) for f in futures]
        _, err = proc.communicate(timeout=DRAIN_TIMEOUT_S + 30)
        took = time.monotonic() - t_term
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert [s for s, _ in results] == [200] * 50
    assert all(r["outputs"][0]["shape"] == [1, 16] for _, r in results)
    assert proc.returncode == 0, err
    assert took < DRAIN_TIMEOUT_S
    assert "outpost serve: stopped\n" in err  # not "(some requests were cut off)"
    assert int(stopping.fields["STATUS"].split()[1]) == 50


def test_fleet_serve_notifies_ready_watchdog_and_stopping(tmp_path: pathlib.Path,
                                                          notify_socket: NotifySocket) -> None:
    port = _free_port()
    proc = _spawn(["fleet", "serve", "--data", str(tmp_path / "fleet"), "--port", str(port)], notify_socket,
                  tmp_path, watchdog_usec=400_000)
    try:
        (ready,) = notify_socket.wait_for("READY", "1", timeout_s=60)
        assert ready.fields["STATUS"] == f"serving on http://127.0.0.1:{port}"
        assert _status(f"http://127.0.0.1:{port}/api/v1/health") == 200  # READY means it answers
        notify_socket.wait_for("WATCHDOG", "1", count=3, timeout_s=10)
        proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING", "1", timeout_s=10)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
