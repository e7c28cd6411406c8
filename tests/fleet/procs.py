"""Real `outpost fleet serve` processes for the CLI, multi-process and fuzz tests."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

OUTPOST = [sys.executable, "-m", "cli.main"]
REPO = pathlib.Path(__file__).resolve().parents[2]


def outpost(*args: str, env: dict[str, str] | None = None, check: bool = True,
            timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*OUTPOST, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout_s,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"outpost {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    url: str
    log: list[str]


@contextlib.contextmanager
def fleet_server(data_dir: pathlib.Path, db_url: str | None, trust: Sequence[pathlib.Path],
                 extra: Sequence[str] = ()) -> Iterator[ServerProcess]:
    args = [*OUTPOST, "fleet", "serve", "--data", str(data_dir), "--port", "0", *extra]
    if db_url:
        args += ["--db", db_url]
    for key in trust:
        args += ["--trust", str(key)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    log: list[str] = []
    drain: threading.Thread | None = None
    try:
        assert proc.stdout is not None
        url = ""
        for line in proc.stdout:
            log.append(line)
            if line.startswith("fleet: listening on "):
                url = line.split()[-1]
                break
        if not url:
            raise AssertionError("fleet server did not start:\n" + "".join(log))
        drain = threading.Thread(target=lambda: log.extend(proc.stdout or ()), daemon=True)
        drain.start()
        yield ServerProcess(proc, url, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if drain is not None:
            drain.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
