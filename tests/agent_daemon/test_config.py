"""The daemon's TOML config: the example lists every default; typos and unsigned set-ups are refused."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import pytest

from agent.daemon import config as cfg
from agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE = pathlib.Path(cfg.__file__).with_name("agent.example.toml")


def test_example_file_shows_every_key_with_its_default() -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    parsed = cfg.parse(doc, EXAMPLE.parent)
    for section, cls, value in (("sync", cfg.SyncConfig, parsed.sync), ("update", cfg.UpdateConfig, parsed.update),
                                ("server", cfg.HttpConfig, parsed.http), ("model", cfg.ServingConfig, parsed.serving),
                                ("mqtt", cfg.MqttConfig, parsed.mqtt)):
        assert set(doc[section]) == {f.name for f in dataclasses.fields(cls)}, section
        assert value == cls(), section
    for key in doc["agent"]:
        assert f"    {key} = " in (cfg.__doc__ or ""), f"[agent].{key} undocumented in agent/daemon/config.py"


@pytest.mark.parametrize(("toml", "message"), [
    ('[agent]\ntrust = ["k.pub"]\n[update]\nretain_version = 3\n', "unknown key(s) retain_version"),
    ('[agent]\ntrust = []\n', "there is no unsigned mode"),
    ('[agent]\n', "there is no unsigned mode"),
    ('[agent]\ntrust = ["k.pub"]\n[sync]\nlong_poll_s = "soon"\n', "[sync].long_poll_s: expected float"),
    ('[agent]\ntrust = ["k.pub"]\n[agents]\n', "unknown section(s) agents"),
    ('[agent]\ntrust = ["k.pub"]\nallow_unsigned = true\n', "unknown key(s) allow_unsigned"),
])
def test_bad_config_is_refused_with_the_key_named(tmp_path: pathlib.Path, toml: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        cfg.load(path)
    assert message in str(e.value)


def test_paths_are_relative_to_the_config_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "etc" / "agent.toml"
    path.parent.mkdir()
    path.write_text('[agent]\nstate_dir = "../var"\ncredential = "cred.json"\ntrust = ["keys/a.pub"]\n'
                    '[sync]\nlong_poll_s = 5\n')
    c = cfg.load(path)
    assert c.state_dir == (tmp_path / "var").resolve()
    assert c.fleet_key == (tmp_path / "etc" / "fleet-assignment.pub").resolve()
    assert c.trust == ((tmp_path / "etc" / "keys" / "a.pub").resolve(),)
    assert c.sync.long_poll_s == 5.0 and isinstance(c.sync.long_poll_s, float)


def test_server_section_reaches_the_http_edge(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\ntrust = ["k.pub"]\n[server]\nbody_budget_wait_s = 0.5\ndrain_timeout_s = 3\n')
    server = cfg.load(path).server_config()
    assert server.body_budget_wait_s == 0.5 and server.drain_timeout_s == 3.0
    path.write_text('[agent]\ntrust = ["k.pub"]\n[server]\nbody_budget_wait_s = -1.0\n')
    with pytest.raises(ConfigError, match="body_budget_wait_s must be >= 0"):
        cfg.load(path).server_config()
