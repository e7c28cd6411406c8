"""Drive `wrk` (Debian's, with a Lua script that posts a prepared body) and parse what it prints."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
from dataclasses import dataclass

LUA = pathlib.Path(__file__).with_name("post.lua")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers + socket errors (timeouts, resets)


def available() -> bool:
    return shutil.which("wrk") is not None


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse(out: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    return WrkResult(rps, p50, p99, total, errors)


def run(url: str, body_file: pathlib.Path, content_type: str, concurrency: int, duration_s: float,
        header_length: int | None = None, timeout_s: float = 30.0) -> WrkResult:
    threads = min(concurrency, 2)
    env = {**os.environ, "BODY_FILE": str(body_file), "CTYPE": content_type,
           "HEADER_LEN": "" if header_length is None else str(header_length)}
    cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration_s:g}s", f"--timeout={timeout_s:g}s",
           "--latency", "-s", str(LUA), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                         timeout=duration_s + timeout_s + 30).stdout
    return parse(out)
