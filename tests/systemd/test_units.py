"""The units as shipped: exposure scores within target, drop-ins that relax only what they say, and the
MemoryDenyWriteExecute=yes promise checked by running the real servers under the same kernel rule."""

from __future__ import annotations

import configparser
import ctypes
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from fleet.config import DEFAULT_PORT
from tests.conftest import MakeBundle
from tests.systemd.conftest import ROOT, UNITS, systemd_analyze

#: unit (as installed) -> (drop-ins from systemd/ installed beside it, highest exposure allowed)
TARGETS = {
    "cpu agent": ("outpost-agent.service", (), 1.5),
    "gpu agent": ("outpost-agent.service", ("outpost-gpu.conf",), 2.0),
    "serve@ (cpu)": ("outpost-serve@.service", (), 1.5),
    "serve@ (gpu)": ("outpost-serve@.service", ("outpost-gpu.conf",), 2.0),
    "fleet": ("outpost-fleet.service", (), 1.5),
    "fleet on postgresql": ("outpost-fleet.service", ("outpost-fleet-postgresql.conf",), 1.5),
}


def exposure(root: pathlib.Path, unit: str) -> tuple[float, str]:
    name = unit.replace("@.", "@sample.")
    proc = subprocess.run([systemd_analyze(), "security", "--offline=true", f"--root={root}", "--no-pager", name],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return float(m.group(1)), proc.stdout


def fake_root(tmp_path: pathlib.Path, unit: str, dropins: tuple[str, ...]) -> pathlib.Path:
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    shutil.copy(UNITS / unit, units / unit)
    for d in dropins:
        (units / f"{unit}.d").mkdir(exist_ok=True)
        shutil.copy(UNITS / d, units / f"{unit}.d" / d)
    return tmp_path


@pytest.mark.parametrize("variant", list(TARGETS))
def test_exposure_within_target(tmp_path: pathlib.Path, variant: str) -> None:
    unit, dropins, target = TARGETS[variant]
    score, report = exposure(fake_root(tmp_path, unit, dropins), unit)
    assert score <= target, f"{variant}: exposure {score} > {target}\n{report}"
    if "outpost-gpu.conf" in dropins:
        assert "/dev/nvmap:rw" in report and "char-nvidia-frontend:rw" in report  # the drop-in was applied


def test_the_scorer_would_notice_a_regression(tmp_path: pathlib.Path) -> None:
    """The same scorer on the old Type=simple serve unit's hardening level is far over target."""
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    (units / "weak.service").write_text("[Service]\nExecStart=/bin/true\nNoNewPrivileges=yes\nProtectSystem=strict\n")
    score, _ = exposure(tmp_path, "weak.service")
    assert score > 5


def _all(path: pathlib.Path, key: str) -> list[str]:
    """Every value of a directive that may repeat (configparser keeps only the last)."""
    return [line.split("=", 1)[1] for line in path.read_text().splitlines() if line.startswith(f"{key}=")]


def _service(path: pathlib.Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("unit", ["outpost-agent.service", "outpost-serve@.service", "outpost-fleet.service"])
def test_every_unit_is_notify_with_watchdog_directories_and_no_capabilities(unit: str) -> None:
    text = (UNITS / unit).read_text()
    s = _service(UNITS / unit)["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["WatchdogSec"] == "30s" and s["Restart"] == "on-failure"
    assert s["CapabilityBoundingSet"] == "" and s["AmbientCapabilities"] == ""
    assert "CacheDirectory" in s and "ConfigurationDirectory" in s
    assert s.get("DynamicUser") == "yes" or s["User"] not in ("root", "0")
    assert "PYTHONFAULTHANDLER=1" in " ".join(_all(UNITS / unit, "Environment"))  # stacks on a watchdog abort
    # Restarts within the start limit outnumber the agent's own crash-loop revert threshold (3 by default).
    assert int(_service(UNITS / unit)["Unit"]["StartLimitBurst"]) >= 5
    # Every relaxed setting says why, on the comment lines right above it.
    lines = text.splitlines()
    for relaxed in ("ProcSubset=all", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        if relaxed in lines:
            assert "# Relaxed:" in _comment_above(lines, lines.index(relaxed)), f"{unit}: {relaxed} says not why"
    assert "# Relaxed: no IPAddressDeny=" in text


def _comment_above(lines: list[str], index: int) -> str:
    block: list[str] = []
    while index > 0 and lines[index - 1].startswith("#"):
        index -= 1
        block.insert(0, lines[index])
    return "\n".join(block)


def test_gpu_dropin_explains_every_relaxation() -> None:
    lines = (UNITS / "outpost-gpu.conf").read_text().splitlines()
    relaxed = [i for i, line in enumerate(lines)
               if line.startswith(("PrivateDevices=no", "SupplementaryGroups=", "MemoryDenyWriteExecute=no"))]
    assert len(relaxed) == 3
    for i in relaxed:
        assert "# Relaxed:" in _comment_above(lines, i), lines[i]


def test_engine_cache_goes_to_the_cache_directory() -> None:
    """OUTPOST_ENGINE_CACHE is what engines/ reads; it must point inside CacheDirectory=."""
    from engines.pipeline import default_cache_dir
    for unit in ("outpost-agent.service", "outpost-serve@.service"):
        s = _service(UNITS / unit)["Service"]
        assert s["CacheDirectory"] == "outpost/engines"
        env = dict(kv.split("=", 1) for line in _all(UNITS / unit, "Environment") for kv in line.split())
        assert env["OUTPOST_ENGINE_CACHE"] == "%C/outpost/engines"  # %C = /var/cache for system units
    old = os.environ.get("OUTPOST_ENGINE_CACHE")
    os.environ["OUTPOST_ENGINE_CACHE"] = "/var/cache/outpost/engines"
    try:
        assert str(default_cache_dir()) == "/var/cache/outpost/engines"
    finally:
        if old is None:
            del os.environ["OUTPOST_ENGINE_CACHE"]
        else:
            os.environ["OUTPOST_ENGINE_CACHE"] = old


def test_fleet_unit_port_is_the_servers_default() -> None:
    s = _service(UNITS / "outpost-fleet.service")["Service"]
    assert f"OUTPOST_FLEET_PORT={DEFAULT_PORT}" in " ".join(_all(UNITS / "outpost-fleet.service", "Environment"))
    assert "--port ${OUTPOST_FLEET_PORT}" in s["ExecStart"]


# ------------------------------------------------------------------ MemoryDenyWriteExecute=yes, for real

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _deny_write_execute() -> None:
    """The kernel's own MDWE (Linux >= 6.3), inherited across exec: what systemd's seccomp rule enforces."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


_WX_MAP = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"


def _mdwe_enforced() -> bool:
    """True when a child under the rule really cannot map writable+executable memory."""
    probe = subprocess.run([sys.executable, "-c", _WX_MAP], preexec_fn=_deny_write_execute, capture_output=True,
                           text=True)
    return probe.returncode != 0 and "PermissionError" in probe.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[str], timeout_s: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return bytes(r.read())
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_serve_and_fleet_run_with_write_execute_denied(make_bundle: MakeBundle, tmp_path: pathlib.Path,
                                                       keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    """The units keep MemoryDenyWriteExecute=yes on CPU: ONNX Runtime, uvloop, aiohttp, SQLAlchemy must cope."""
    if not _mdwe_enforced():
        pytest.fail("this kernel has no PR_SET_MDWE (Linux >= 6.3 needed to check MemoryDenyWriteExecute)")
    b = make_bundle("mlp", name="mdwe")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OUTPOST_ENGINE_CACHE": str(tmp_path / "cache")}
    port = _free_port()
    serve = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", str(b), "--trust", str(keypair[1]),
                              "--port", str(port)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, preexec_fn=_deny_write_execute)
    fport = _free_port()
    fleet = subprocess.Popen([sys.executable, "-m", "cli.main", "fleet", "serve", "--data", str(tmp_path / "fleet"),
                              "--port", str(fport)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, preexec_fn=_deny_write_execute)
    try:
        _wait_http(f"http://127.0.0.1:{port}/v2/health/ready", serve)
        body = b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [' + \
            b",".join([b"0.5"] * 64) + b"]}]}"
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/mdwe/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200 and b'"logits"' in r.read()
        assert b'"ok"' in _wait_http(f"http://127.0.0.1:{fport}/api/v1/health", fleet)
    finally:
        rc, err = _stop(serve)
        frc, ferr = _stop(fleet)
    assert rc == 0, err
    assert frc == 0, ferr
