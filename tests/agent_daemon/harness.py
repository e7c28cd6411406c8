"""Real processes for the agent tests: a fleet server, enrolled agents, bundles pushed and assigned over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
OUTPOST = [sys.executable, "-m", "cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: Any = None, token: str | None = None, raw: bytes | None = None,
         timeout_s: float = 30) -> tuple[int, Any]:
    headers = {"Accept": "application/json"}
    data = raw
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif raw is not None:
        headers["Content-Type"] = "application/octet-stream"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            payload = r.read()
            if "json" not in r.headers.get("Content-Type", ""):
                return r.status, payload.decode(errors="replace")
            return r.status, json.loads(payload) if payload else None
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            return e.code, json.loads(payload)
        except ValueError:
            return e.code, payload.decode(errors="replace")


class Proc:
    """A child process whose merged output is kept (and drained so it never blocks)."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()

    def wait_line(self, prefix: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for line in self.lines:
                    if prefix in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line with {prefix!r}; exit {self.proc.poll()}:\n{self.output}")
                self._cv.wait(min(left, 0.2))

    @property
    def output(self) -> str:
        return "".join(self.lines[-200:])

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close()


class Fleet:
    def __init__(self, data_dir: pathlib.Path, trust: pathlib.Path, port: int | None = None,
                 extra: Sequence[str] = ()) -> None:
        self.extra = tuple(extra)
        self.data_dir = data_dir
        self.trust = trust
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None
        self.token = ""

    def start(self) -> None:
        self.proc = Proc([*OUTPOST, "fleet", "serve", "--data", str(self.data_dir), "--port", str(self.port),
                          "--trust", str(self.trust), *self.extra])
        self.proc.wait_line("fleet: listening on ")
        if not self.token:
            out = subprocess.run([*OUTPOST, "fleet", "token", "create", "--data", str(self.data_dir), "--role",
                                  "admin", "--name", "tests"], capture_output=True, text=True, cwd=REPO, check=True)
            self.token = out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def api(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        status, doc = http(method, self.url + path, body, self.token, raw)
        if status >= 300:
            raise AssertionError(f"{method} {path} -> {status}: {doc}")
        return doc

    def push(self, archive: pathlib.Path) -> Any:
        status, doc = http("POST", self.url + "/api/v1/bundles", token=self.token, raw=archive.read_bytes())
        if status not in (200, 201, 409):
            raise AssertionError(f"push {archive} -> {status}: {doc}")
        return doc

    def assign(self, device_id: str, *refs: str) -> int:
        return int(self.api("PUT", f"/api/v1/devices/{device_id}/assignment", {"bundles": list(refs)})["serial"])

    def enroll_token(self) -> str:
        return str(self.api("POST", "/api/v1/enroll-tokens", {"uses": 1})["token"])


class Agent:
    """An enrolled `outpost agent run` over its own state directory (restartable, killable)."""

    def __init__(self, root: pathlib.Path, fleet: Fleet, trust: pathlib.Path, **overrides: Any) -> None:
        self.root = root
        self.fleet = fleet
        root.mkdir(parents=True, exist_ok=True)
        self.credential = root / "credential.json"
        out = subprocess.run([*OUTPOST, "agent", "enroll", "--fleet", fleet.url, "--token", fleet.enroll_token(),
                              "--credential", str(self.credential), "--json"],
                             capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stdout + out.stderr
        self.device_id = json.loads(out.stdout)["device_id"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = root / "agent.toml"
        sections: dict[str, dict[str, Any]] = {
            "agent": {"state_dir": "state", "credential": "credential.json", "trust": [str(trust)]},
            "sync": {"long_poll_s": 10.0, "retry_base_s": 0.2, "retry_max_s": 1.0, "report_period_s": 1.0},
            "update": {"health_runs": 3, "stable_after_s": 2.0, "max_failed_starts": 3, "disk_margin_bytes": 0},
            "server": {"port": self.port, "drain_timeout_s": 5.0},
            "model": {"threads": 1, "inline_compute_ms": 0.0},
        }
        for key, value in overrides.items():
            section, _, name = key.partition("__")
            sections.setdefault(section, {})[name] = value
        self.config.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in kv.items())
                                       for s, kv in sections.items()))
        self.proc: Proc | None = None

    def start(self, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        self.proc = Proc([*OUTPOST, "-v", "agent", "run", "--config", str(self.config), "--loop", "asyncio"], env)
        if wait:
            self.proc.wait_line("outpost agent: ready on ")
        return self.proc

    def stop(self) -> int:
        assert self.proc is not None
        rc = self.proc.stop()
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def status(self) -> dict[str, Any]:
        from agent.daemon.commands import status_doc
        return status_doc(self.config)

    def wait_for(self, predicate: Any, timeout_s: float = 60, what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if predicate(st):
                return st
            if time.monotonic() > deadline:
                out = self.proc.output if self.proc else ""
                raise AssertionError(f"timed out waiting for {what}: {json.dumps(st, indent=1)[:4000]}\n{out}")
            time.sleep(0.1)

    def wait_serving(self, name: str, version: str, timeout_s: float = 60) -> dict[str, Any]:
        return self.wait_for(lambda st: st["models"].get(name, {}).get("version") == version, timeout_s,
                             f"{name}@{version} served")

    def infer(self, model: str, x: np.ndarray, timeout_s: float = 10) -> tuple[str, np.ndarray]:
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}
        status, doc = http("POST", f"{self.url}/v2/models/{model}/infer", body, timeout_s=timeout_s)
        if status != 200:
            raise AssertionError(f"infer -> {status}: {doc}")
        out = doc["outputs"][0]
        return str(doc["model_version"]), np.asarray(out["data"], np.float32).reshape(out["shape"])


def _toml(v: Any) -> str:
    return json.dumps(v)


@contextlib.contextmanager
def running(*procs: Fleet | Agent) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.stop() if isinstance(p, Fleet) else (p.kill() if p.proc else None)
