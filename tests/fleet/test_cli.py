"""`outpost fleet ...` end to end: real processes, real server, the output people and scripts read."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import urllib.request

import bundle
from tests.conftest import MakeBundle

from .procs import fleet_server, outpost


def _enroll(url: str, enroll_token: str) -> dict[str, str]:
    req = urllib.request.Request(f"{url}/api/v1/enroll", data=json.dumps({"name": "cam-1"}).encode(),
                                 method="POST", headers={"Authorization": f"Bearer {enroll_token}",
                                                         "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return dict(json.loads(r.read()))


def test_cli_end_to_end(tmp_path: pathlib.Path, make_bundle: MakeBundle,
                        keypair: tuple[pathlib.Path, pathlib.Path],
                        other_keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    data = tmp_path / "data"
    first = outpost("fleet", "keys", "init", "--data", str(data))
    key = data / "keys" / "assignment.key"
    assert "created" in first.stdout and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "kept existing" in outpost("fleet", "keys", "init", "--data", str(data)).stdout
    admin = outpost("fleet", "token", "create", "--data", str(data), "--role", "admin").stdout.splitlines()[-1]
    made = outpost("fleet", "token", "create", "--data", str(data), "--role", "viewer")
    viewer, viewer_id = made.stdout.splitlines()[-1], made.stderr.split("viewer token ")[1].split()[0]
    assert admin.startswith("otk_") and viewer.startswith("otk_")

    with fleet_server(data, None, [keypair[1]]) as server:
        env = {"OUTPOST_FLEET_URL": server.url, "OUTPOST_FLEET_TOKEN": admin}
        flags = ["--url", server.url, "--token", admin]

        d = make_bundle("mlp", name="demo", version="1.0.0")
        assert "pushed: demo@1.0.0" in outpost("fleet", "push", str(d), env=env).stdout
        archive = bundle.pack(d, tmp_path / "demo.tar.gz")
        assert "already present" in outpost("fleet", "push", str(archive), *flags).stdout
        untrusted = make_bundle("mlp", name="demo", version="1.0.1", key=other_keypair[0])
        refused = outpost("fleet", "push", str(untrusted), env=env, check=False)
        assert refused.returncode == 1 and "HTTP 422" in refused.stderr and "rejected" in refused.stderr

        table = outpost("fleet", "bundles", env=env).stdout.splitlines()
        assert table[0].split()[:3] == ["REF", "RELEASE", "SIZE"] and table[1].startswith("demo@1.0.0")
        listed = json.loads(outpost("fleet", "bundles", "--json", env=env).stdout)
        assert [b["ref"] for b in listed["bundles"]] == ["demo@1.0.0"]

        enroll_token = outpost("fleet", "enroll-token", "create", "--uses", "2", "--ttl", "1h",
                               "--label", "site=north", env=env).stdout.splitlines()[-1]
        assert enroll_token.startswith("enr_")
        device = _enroll(server.url, enroll_token)["device_id"]

        devices = json.loads(outpost("fleet", "devices", "--label", "site=north", "--json", env=env).stdout)
        assert [x["id"] for x in devices["devices"]] == [device]
        assert json.loads(outpost("fleet", "devices", "--label", "site=south", "--json",
                                  env=env).stdout)["devices"] == []
        assert device in outpost("fleet", "devices", env=env).stdout

        assert "serial 1" in outpost("fleet", "assign", device, "demo@1.0.0", env=env).stdout
        shown = outpost("fleet", "device", device, env=env).stdout
        assert "demo@1.0.0" in shown and "cam-1" in shown
        assert json.loads(outpost("fleet", "device", device, "--json", env=env).stdout)["assigned"] == ["demo@1.0.0"]

        assert "1 device(s) told" in outpost("fleet", "revoke", "demo@1.0.0", "--reason", "bad", env=env).stdout
        again = outpost("fleet", "assign", device, "demo@1.0.0", env=env, check=False)
        assert again.returncode == 1 and "HTTP 409" in again.stderr

        # the config file is the last resort; flags and environment win over it
        config = tmp_path / "fleet.json"
        config.write_text(json.dumps({"url": server.url, "token": viewer}))
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_FLEET_")}
        viewer_env = {**clean_env, "OUTPOST_FLEET_CONFIG": str(config)}
        assert "demo@1.0.0" in outpost("fleet", "bundles", env=viewer_env).stdout
        forbidden = outpost("fleet", "push", str(d), env=viewer_env, check=False)
        assert forbidden.returncode == 1 and "HTTP 403" in forbidden.stderr
        anonymous = outpost("fleet", "bundles", "--url", server.url, "--token", "otk_wrong", env=clean_env,
                            check=False)
        assert anonymous.returncode == 1 and "HTTP 401" in anonymous.stderr and "Traceback" not in anonymous.stderr

        # an admin revokes the viewer's token by its id: refused at once, and a second revoke is a 404
        assert f"revoked token {viewer_id}" in outpost("fleet", "token", "revoke", viewer_id, env=env).stdout
        revoked = outpost("fleet", "bundles", env=viewer_env, check=False)
        assert revoked.returncode == 1 and "HTTP 401" in revoked.stderr
        twice = outpost("fleet", "token", "revoke", viewer_id, "--json", env=env, check=False)
        assert twice.returncode == 1 and "HTTP 404" in twice.stderr
