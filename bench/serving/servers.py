"""The servers under test as child processes: start, time to ready, RSS of the process tree, stop."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import psutil


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: list[str]
    ready_url: str
    #: body format -> (URL, payload key): "json" and, where the server has one, "binary"
    routes: dict[str, tuple[str, str]]
    env: dict[str, str] = field(default_factory=dict)
    cwd: pathlib.Path | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its children: cost per request
    measured this way holds up when other work shares the machine, unlike requests/s."""
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


class Running:
    def __init__(self, spec: ServerSpec, log_path: pathlib.Path, ready_timeout_s: float = 120.0) -> None:
        self.spec = spec
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(spec.argv, cwd=spec.cwd, env={**os.environ, **spec.env}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.start_to_ready_s = self._wait_ready(t0, ready_timeout_s)
        self.peak_rss = 0
        self.idle_rss = 0

    def _wait_ready(self, t0: float, timeout_s: float) -> float:
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.spec.ready_url, timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{self.spec.name} not ready after {timeout_s} s; see {self.log.name}")

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid)

    def rss(self) -> int:
        return tree_rss_bytes(self.proc.pid)

    def measure_idle(self, settle_s: float = 1.5) -> None:
        time.sleep(settle_s)
        self.idle_rss = self.rss()
        self.peak_rss = max(self.peak_rss, self.idle_rss)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own child's process group
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


class PeakSampler:
    """Samples the RSS of the servers being loaded, every `interval_s`, keeping each one's peak."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.watch: list[Running] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            for r in list(self.watch):
                r.peak_rss = max(r.peak_rss, r.rss())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
