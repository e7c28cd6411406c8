"""`outpost up`: the main job on one machine, in one command.

Starts a fleet server (SQLite, local blobs) and an agent enrolled to it, as
two child processes (`outpost fleet serve`, `outpost agent run`: the agent
and the fleet still meet only over HTTP), builds a sample model into a
signed bundle, pushes and assigns it, waits until the agent serves it, and
prints a ready-to-paste curl. Ctrl-C (or SIGTERM) stops the agent, then the
fleet, each draining first. Everything lives under --data and is reused by
the next run (keys, bundle, enrollment); delete the directory to start over.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import click

import bundle

MODEL = "sample-mlp"
VERSION = "1.0.0"


class UpFailed(click.ClickException):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(method: str, url: str, token: str | None = None, body: Any = None, raw: bytes | None = None,
          timeout_s: float = 30) -> tuple[int, Any]:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    elif raw is not None:
        headers["Content-Type"] = "application/octet-stream"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            payload = r.read()
            return r.status, json.loads(payload) if payload else None
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:500]


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UpFailed(f"{what} exited with {proc.returncode} before it was ready (see its log above)")
        with contextlib.suppress(OSError):
            status, _ = _call("GET", url, timeout_s=2)
            if status == 200:
                return
        time.sleep(0.2)
    raise UpFailed(f"{what} was not ready at {url} after {timeout_s:.0f} s")


def _outpost(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def _sample_bundle(data: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(signed archive, publisher public key), made once under data/."""
    keys = data / "keys"
    if not (keys / "signing.pub").exists():
        bundle.generate_keys(keys)
    archive = data / "sample" / f"{MODEL}-{VERSION}.tar"
    if not archive.exists():
        import onnx

        from .sample_model import sample_mlp
        work = data / "sample"
        work.mkdir(parents=True, exist_ok=True)
        onnx.save_model(sample_mlp(), str(work / "mlp.onnx"))
        bdir = work / "bundle"
        if bdir.exists():
            import shutil
            shutil.rmtree(bdir)
        bundle.build([work / "mlp.onnx"], bdir, bundle.BuildOptions(
            name=MODEL, version=VERSION, release=1, description="outpost up sample classifier",
            max_batch_size=32, max_queue_delay_ms=2.0))
        bundle.sign_directory(bdir, keys / "signing.key")
        bundle.pack(bdir, archive)
    return archive, keys / "signing.pub"


@contextlib.contextmanager
def _children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in reversed(procs):  # agent first (it drains), then the fleet
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def curl_line(port: int) -> str:
    data = ",".join(f"{0.01 * i:.2f}" for i in range(64))
    body = f'{{"inputs":[{{"name":"input","shape":[1,64],"datatype":"FP32","data":[{data}]}}]}}'
    return (f"curl -s -X POST http://127.0.0.1:{port}/v2/models/{MODEL}/infer "
            f"-H 'Content-Type: application/json' -d '{body}'")


@click.command("up")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="The agent's inference port (0: any free port).")
@click.option("--fleet-port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="The fleet server's port (0: any free port).")
@click.option("--data", "data_dir", default="outpost-up", show_default=True,
              type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Where the fleet, the agent and the sample live (reused by the next run).")
def up_command(port: int, fleet_port: int, data_dir: pathlib.Path) -> None:
    """Fleet + enrolled agent + a signed sample model assigned and served, in one command (Ctrl-C stops all)."""
    data = data_dir.absolute()
    data.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    fleet_port = fleet_port or _free_port()
    stop = {"now": False, "serving": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True
        if not stop["serving"]:
            raise KeyboardInterrupt  # still starting: unwind (the children are stopped on the way out)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        _up(data, port, fleet_port, stop)
    except KeyboardInterrupt:
        click.echo("outpost up: interrupted; stopped", err=True)
        sys.exit(130)


def _up(data: pathlib.Path, port: int, fleet_port: int, stop: dict[str, bool]) -> None:
    fleet_url = f"http://127.0.0.1:{fleet_port}"
    click.echo("outpost up: building and signing the sample model", err=True)
    archive, pub = _sample_bundle(data)
    with _children() as procs:
        procs.append(subprocess.Popen(_outpost("fleet", "serve", "--data", str(data / "fleet"), "--port",
                                               str(fleet_port), "--trust", str(pub)), start_new_session=True))
        _wait_http(f"{fleet_url}/api/v1/health", procs[0], "the fleet server")
        token_file = data / "fleet" / "up-admin-token"
        if not token_file.exists():
            out = subprocess.run(_outpost("fleet", "token", "create", "--data", str(data / "fleet"), "--role",
                                          "admin", "--name", "outpost-up"), capture_output=True, text=True,
                                 check=True)
            bundle.atomic_write_bytes(token_file, out.stdout.strip().splitlines()[-1].encode(), mode=0o600)
        token = token_file.read_text().strip()
        status, doc = _call("POST", f"{fleet_url}/api/v1/bundles", token, raw=archive.read_bytes())
        if status not in (200, 201, 409):
            raise UpFailed(f"pushing the sample bundle failed: HTTP {status}: {doc}")
        agent_dir = data / "agent"
        credential = agent_dir / "credential.json"
        if not credential.exists():
            status, doc = _call("POST", f"{fleet_url}/api/v1/enroll-tokens", token, {"uses": 1})
            if status != 201:
                raise UpFailed(f"creating an enrollment token failed: HTTP {status}: {doc}")
            subprocess.run(_outpost("agent", "enroll", "--fleet", fleet_url, "--credential", str(credential)),
                           check=True, env={**os.environ, "OUTPOST_ENROLL_TOKEN": doc["token"]},
                           stdout=subprocess.DEVNULL)
        device_id = json.loads(credential.read_text())["device_id"]
        config = agent_dir / "agent.toml"
        config.write_text(
            f'[agent]\nstate_dir = "state"\ncredential = "credential.json"\nfleet_url = "{fleet_url}"\n'
            f'trust = ["{pub}"]\n[sync]\nlong_poll_s = 25.0\nreport_period_s = 10.0\n'
            f'[server]\nport = {port}\n')
        procs.append(subprocess.Popen(_outpost("agent", "run", "--config", str(config)), start_new_session=True))
        status, doc = _call("PUT", f"{fleet_url}/api/v1/devices/{device_id}/assignment", token,
                            {"bundles": [f"{MODEL}@{VERSION}"]})
        if status != 200:
            raise UpFailed(f"assigning the sample failed: HTTP {status}: {doc}")
        _wait_http(f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready", procs[1], "the agent")
        click.echo(f"\noutpost up: ready. Fleet {fleet_url} (admin token in {token_file}); agent "
                   f"http://127.0.0.1:{port} serving {MODEL}@{VERSION} as device {device_id}.\n"
                   f"Try:\n\n  {curl_line(port)}\n\nCtrl-C stops everything.", err=True)
        stop["serving"] = True
        while not stop["now"] and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        if not stop["now"]:
            raise UpFailed("a child process exited; stopping the other")
        click.echo("outpost up: stopping the agent and the fleet", err=True)
