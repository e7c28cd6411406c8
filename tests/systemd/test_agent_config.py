"""systemd/agent.toml.in against the agent's config loader and the unit: every key valid, every path where
the unit's directories and install.sh's enrollment put things, and `outpost agent run` starts on it."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import time

from agent.daemon.config import load
from tests.agent_daemon.conftest import make_version
from tests.agent_daemon.harness import OUTPOST, REPO, Fleet, Proc, free_port, running
from tests.models.make_models import mlp
from tests.systemd.conftest import UNITS
from tests.systemd.notify_socket import NotifySocket

TEMPLATE = UNITS / "agent.toml.in"
FLEET_URL = "https://fleet.example:8780"


def render(dest: pathlib.Path, fleet_url: str = FLEET_URL) -> pathlib.Path:
    """The template as install.sh step 4 writes it (the same sed)."""
    script = (UNITS / "install.sh").read_text()
    assert 'sed "s|@FLEET_URL@|${fleet_url:-https://fleet.example.com:8780}|" "$here/agent.toml.in"' in script
    text = subprocess.run(["sed", f"s|@FLEET_URL@|{fleet_url}|", str(TEMPLATE)], capture_output=True, text=True,
                          check=True).stdout
    dest.write_text(text)
    return dest


def unit_setting(name: str) -> str:
    (value,) = re.findall(rf"^{name}=(.*)$", (UNITS / "outpost-agent.service").read_text(), re.M)
    return str(value).strip()


def test_template_loads_and_points_where_the_unit_and_enrollment_put_things(tmp_path: pathlib.Path) -> None:
    config = load(render(tmp_path / "agent.toml"))
    assert "@" not in (tmp_path / "agent.toml").read_text().replace(f"Enrolled with {FLEET_URL}", "")
    # StateDirectory= and CacheDirectory= of the unit (systemd creates them, owned by the service user)
    assert unit_setting("StateDirectory") == "outpost" and unit_setting("CacheDirectory") == "outpost/engines"
    assert config.state_dir.is_relative_to("/var/lib/outpost")
    assert config.engine_cache_dir == pathlib.Path("/var/cache/outpost/engines")
    # install.sh enrolls with --credential at the path the config reads; the fleet key lands beside it
    script = (UNITS / "install.sh").read_text()
    assert f"--credential {config.credential}" in script
    assert config.credential == pathlib.Path("/var/lib/outpost/credential.json")
    assert config.fleet_key == pathlib.Path("/var/lib/outpost/fleet-assignment.pub")
    # the publisher key install.sh --trust installs
    assert config.trust == (pathlib.Path("/etc/outpost/trusted/publisher.pub"),)
    assert '"$etc/trusted/publisher.pub"' in script
    # the drain fits in TimeoutStopSec= with the last report's few seconds
    assert config.http.drain_timeout_s + 5 < float(unit_setting("TimeoutStopSec").removesuffix("s"))
    assert config.http.host == "127.0.0.1"


def test_outpost_agent_run_starts_on_the_rendered_template_once_enrolled(
        tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path], notify_socket: NotifySocket) -> None:
    """The rendered file, its absolute paths moved under a temporary root, runs the real agent."""
    root = tmp_path / "root"
    text = render(tmp_path / "rendered.toml").read_text()
    for prefix in ("/var/lib/outpost", "/var/cache/outpost", "/etc/outpost"):
        assert f'"{prefix}' in text, prefix
        text = text.replace(f'"{prefix}', f'"{root}{prefix}')
    port = free_port()
    text, n = re.subn(r"(?m)^port = 8000$", f"port = {port}", text)
    assert n == 1
    config = root / "etc/outpost/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text(text)
    (root / "etc/outpost/trusted").mkdir()
    shutil.copy(keypair[1], root / "etc/outpost/trusted/publisher.pub")

    v1 = make_version(tmp_path, keypair[0], "demo", "1.0.0", mlp(seed=1))
    fleet = Fleet(tmp_path / "fleet", keypair[1])
    fleet.start()
    agent: Proc | None = None
    with running(fleet):
        # install.sh step 5, minus runuser: the credential where the template says
        out = subprocess.run([*OUTPOST, "agent", "enroll", "--fleet", fleet.url, "--token", fleet.enroll_token(),
                              "--credential", str(root / "var/lib/outpost/credential.json"), "--json"],
                             capture_output=True, text=True, cwd=REPO, check=True)
        device_id = json.loads(out.stdout)["device_id"]
        assert (root / "var/lib/outpost/fleet-assignment.pub").is_file()
        fleet.push(v1.archive)
        fleet.assign(device_id, v1.ref)
        try:
            agent = Proc([*OUTPOST, "agent", "run", "--config", str(config), "--loop", "asyncio"],
                         {"NOTIFY_SOCKET": notify_socket.path})
            notify_socket.wait_for("READY", "1", timeout_s=90)
            deadline = time.monotonic() + 90
            while not any("serving 1 model(s): demo@1.0.0" in m.fields["STATUS"]
                          for m in notify_socket.with_key("STATUS")):
                assert time.monotonic() < deadline, [m.fields for m in notify_socket.with_key("STATUS")]
                time.sleep(0.1)
            assert (root / "var/lib/outpost/state").is_dir()
            # the engine cache is the unit's CacheDirectory=, not a directory under the state
            assert any((root / "var/cache/outpost/engines").iterdir())
            assert not (root / "var/lib/outpost/state/engines").exists()
            assert agent.stop() == 0, agent.output
        finally:
            if agent is not None:
                agent.kill()
