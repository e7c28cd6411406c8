"""systemd/install.sh: --dry-run changes nothing and prints every step; a real run into a fake root installs
a working venv, the units (verified by systemd-analyze), the config template, and is idempotent."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess

import pytest

from agent.daemon.config import load as load_agent_config
from tests.systemd.conftest import UNITS, systemd_analyze, with_system_units

INSTALL = UNITS / "install.sh"
SECRET = "enroll-7f3a9c1e-secret"


def install(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", str(INSTALL), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def offline(wheel: pathlib.Path) -> list[str]:
    """Install the wheel without an index: its dependencies are not what these tests check."""
    return ["--from", str(wheel), "--pip-arg=--no-index", "--pip-arg=--no-deps"]


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "root"
    out = install("--dry-run", "--root", root, "--gpu", "--fleet", "https://fleet.example:8780",
                  "--token", SECRET).stdout
    assert not root.exists()
    for n in range(1, 7):
        assert f"==> {n}. " in out
    assert "useradd --system --user-group --home-dir /var/lib/outpost" in out
    assert "usermod --append --groups video outpost" in out
    assert f"-m venv {root}/opt/outpost/.venv" in out
    assert "-m pip install -q " in out and "\\[gpu\\]" in out
    assert f"{root}/etc/systemd/system/outpost-agent.service.d/gpu.conf" in out
    assert f"{root}/etc/systemd/system/outpost-serve@.service.d/gpu.conf" in out
    assert ("outpost agent enroll --fleet https://fleet.example:8780 --token ******** "
            "--credential /var/lib/outpost/credential.json") in out
    assert SECRET not in out
    assert f"systemctl --root={root} --quiet enable outpost-agent.service" in out
    assert "systemctl enable --now outpost-agent.service" in out


def test_dry_run_on_the_live_system_as_ci_runs_it() -> None:
    existed = pathlib.Path("/opt/outpost").exists()
    out = install("--dry-run", "--cpu").stdout
    assert "installing under / (dry run: nothing changes)" in out
    assert "-m venv /opt/outpost/.venv" in out and "\\[cpu\\]" in out
    assert "/etc/systemd/system/outpost-agent.service" in out
    assert "gpu.conf" not in out
    assert "systemctl daemon-reload" in out and "systemctl enable --now outpost-agent.service" in out
    assert pathlib.Path("/opt/outpost").exists() == existed


def test_bad_options_are_refused() -> None:
    proc = install("--dry-run", "--fleet", "https://f", check=False)
    assert proc.returncode == 2 and "--fleet and --token go together" in proc.stderr
    proc = install("--dry-run", "--bogus", check=False)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


def _mtimes(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "etc").rglob("*") if p.is_file()}


def test_real_install_into_a_root_is_complete_verified_and_idempotent(tmp_path: pathlib.Path,
                                                                      outpost_wheel: pathlib.Path) -> None:
    root = tmp_path / "root"
    out = install("--root", root, "--cpu", *offline(outpost_wheel)).stdout
    venv = root / "opt/outpost/.venv"
    # A real venv with this checkout installed in it.
    assert os.access(venv / "bin/outpost", os.X_OK)
    version = subprocess.run([str(venv / "bin/python"), "-c",
                              "import importlib.metadata as m, importlib.util as u; "
                              "print(m.version('outpost'), u.find_spec('runtime.sdnotify') is not None)"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert version == ["0.1.0", "True"]
    units = root / "etc/systemd/system"
    for name in ("outpost-agent.service", "outpost-serve@.service"):
        assert (units / name).read_bytes() == (UNITS / name).read_bytes()
        assert stat.S_IMODE((units / name).stat().st_mode) == 0o644
    assert not (units / "outpost-agent.service.d").exists()
    wants = units / "multi-user.target.wants/outpost-agent.service"
    assert os.readlink(wants) == "/etc/systemd/system/outpost-agent.service"
    config = root / "etc/outpost/agent.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert "Enrolled with https://fleet.example.com:8780" in config.read_text()
    # The rendered template is a valid agent config, pointing where the unit's directories are.
    c = load_agent_config(config)
    loaded = [str(p) for p in (c.state_dir, c.credential, c.fleet_key, c.engine_cache_dir, *c.trust)]
    assert loaded == ["/var/lib/outpost/state", "/var/lib/outpost/credential.json",
                      "/var/lib/outpost/fleet-assignment.pub", "/var/cache/outpost/engines",
                      "/etc/outpost/trusted/publisher.pub"]
    assert "NOTE: no publisher key yet" in out
    assert stat.S_IMODE((root / "etc/outpost").stat().st_mode) == 0o755
    assert "useradd --system" in out and "(not run under --root)" in out
    assert "skipped (no --fleet/--token)" in out

    # Every unit passes `systemd-analyze verify` against this root (it checks that ExecStart exists there).
    fleet_dropins = units / "outpost-fleet.service.d"
    fleet_dropins.mkdir()
    (units / "outpost-fleet.service").write_bytes((UNITS / "outpost-fleet.service").read_bytes())
    (fleet_dropins / "postgresql.conf").write_bytes((UNITS / "outpost-fleet-postgresql.conf").read_bytes())
    _verify(root, "outpost-agent.service", "outpost-serve@sample.service", "outpost-fleet.service")

    # --trust puts the publisher key where agent.toml names it.
    publisher = tmp_path / "publisher.pub"
    publisher.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot checked here\n-----END PUBLIC KEY-----\n")
    install("--root", root, "--cpu", "--trust", publisher, *offline(outpost_wheel))
    installed_key = root / "etc/outpost/trusted/publisher.pub"
    assert installed_key.read_bytes() == publisher.read_bytes()
    assert stat.S_IMODE(installed_key.stat().st_mode) == 0o644

    # Again: nothing changes, an edited config survives.
    config.write_text(config.read_text() + "# edited by the operator\n")
    before = _mtimes(root)
    again = install("--root", root, "--cpu", "--trust", publisher, *offline(outpost_wheel)).stdout
    assert "venv exists" in again and "already installed" in again
    assert "unchanged" in again and "kept existing" in again
    assert " install -D " not in again and "-m pip install" not in again
    assert _mtimes(root) == before
    assert config.read_text().endswith("# edited by the operator\n")

    # Switching to the GPU runtime adds the drop-in to both device units; back to CPU removes it.
    gpu = install("--root", root, "--gpu", *offline(outpost_wheel)).stdout
    assert "outpost[gpu]" in gpu
    for unit in ("outpost-agent.service", "outpost-serve@.service"):
        assert (units / f"{unit}.d/gpu.conf").read_bytes() == (UNITS / "outpost-gpu.conf").read_bytes()
    _verify(root, "outpost-agent.service", "outpost-serve@sample.service")
    install("--root", root, "--cpu", *offline(outpost_wheel))
    assert not (units / "outpost-agent.service.d/gpu.conf").exists()
    assert not (units / "outpost-serve@.service.d/gpu.conf").exists()


def _verify(root: pathlib.Path, *units: str) -> None:
    proc = subprocess.run([systemd_analyze(), "verify", "--man=no", f"--root={with_system_units(root)}", *units],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("unit", ["outpost-agent.service", "outpost-serve@.service", "outpost-fleet.service"])
def test_verify_fails_when_the_executable_is_missing(tmp_path: pathlib.Path, unit: str) -> None:
    """The check above can fail: the same units in a root without /opt/outpost do not verify."""
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    (units / unit).write_bytes((UNITS / unit).read_bytes())
    name = unit.replace("@.", "@x.")
    proc = subprocess.run([systemd_analyze(), "verify", "--man=no", f"--root={with_system_units(tmp_path)}", name],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "/opt/outpost/.venv/bin/outpost is not executable" in proc.stderr
