"""The device credential file and `outpost agent enroll` against a real fleet."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import stat
import sys

import pytest

from agent.credentials import Credential, load_credential, save_credential
from agent.fleet_client import FleetClient
from agent.fleet_errors import CredentialError
from contract import key_id

from .conftest import LiveFleet

REPO = pathlib.Path(__file__).resolve().parents[3]


def _mode(p: pathlib.Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_credential_is_written_0600_atomically_and_read_back(tmp_path: pathlib.Path) -> None:
    cred = Credential("http://fleet:8080", "d1", "dev_secret", {"site": "lab"}, 1.5)
    path = tmp_path / "state" / "credential.json"
    old = os.umask(0)  # even with a permissive umask the secret is never readable by others
    try:
        save_credential(path, cred)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600 and load_credential(path) == cred
    assert "dev_secret" not in repr(cred)
    save_credential(path, Credential("http://fleet:8080", "d2", "dev_other"))
    assert load_credential(path).device_id == "d2"
    assert sorted(p.name for p in path.parent.iterdir()) == ["credential.json"]  # no temporary left behind


@pytest.mark.parametrize(("content", "mode", "problem"), [
    (None, 0o600, "enroll first"),
    (b"{}", 0o644, "readable by others"),
    (b"not json", 0o600, "not JSON"),
    (b'{"format": 2}', 0o600, "format-1"),
    (b'{"format": 1, "fleet_url": "http://f", "device_id": ""}', 0o600, "missing"),
    (b'{"format": 1, "fleet_url": "u", "device_id": "d", "credential": "c", "labels": [1]}', 0o600, "labels"),
    (b" " * 70000, 0o600, "larger than"),
])
def test_bad_credential_files_are_refused_with_the_fix(tmp_path: pathlib.Path, content: bytes | None, mode: int,
                                                       problem: str) -> None:
    path = tmp_path / "credential.json"
    if content is not None:
        path.write_bytes(content)
        path.chmod(mode)
    with pytest.raises(CredentialError, match=problem):
        load_credential(path)


async def _outpost(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", *args, cwd=REPO, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_enroll_command_writes_the_credential_and_fleet_key_and_never_prints_secrets(
        live_fleet: LiveFleet, tmp_path: pathlib.Path) -> None:
    token = await live_fleet.enroll_token(labels={"site": "lab"})
    path = tmp_path / "agent" / "credential.json"
    rc, out = await _outpost("-vv", "agent", "enroll", "--fleet", live_fleet.url, "--label", "room=3",
                             "--label", "zone=a=b", "--name", "edge-7", "--credential", str(path), "--json",
                             env={"OUTPOST_ENROLL_TOKEN": token})
    assert rc == 0, out
    cred = load_credential(path)
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert token not in out and cred.secret not in out
    shown = json.loads(out[out.index("{"):])
    assert shown["device_id"] == cred.device_id and shown["credential_path"] == str(path)
    assert dict(cred.labels) == {"site": "lab", "room": "3", "zone": "a=b"}
    device = await live_fleet.call("GET", f"/api/v1/devices/{cred.device_id}")
    assert device["name"] == "edge-7"
    pem = (path.parent / "fleet-assignment.pub").read_bytes()
    assert key_id(pem) == shown["fleet_key_id"]
    async with FleetClient.from_credential(cred) as client:  # the credential works
        assert await client.fleet_key() == pem

    # again without --force: refused, the credential untouched; a used-up token: refused, no secret echoed
    rc, out = await _outpost("agent", "enroll", "--fleet", live_fleet.url, "--token", token,
                             "--credential", str(path))
    assert rc != 0 and "already" in out and load_credential(path) == cred
    other = tmp_path / "other.json"
    rc, out = await _outpost("agent", "enroll", "--fleet", live_fleet.url, "--token", token,
                             "--credential", str(other))
    assert rc == 1 and "used up" in out and token not in out and not other.exists()
    rc, out = await _outpost("agent", "enroll", "--fleet", live_fleet.url, "--token", token,
                             "--label", "nolabel", "--credential", str(other))
    assert rc == 2 and "key=value" in out
