"""How much CPU other processes take while we measure: the machine is shared, and a number taken
while someone else's job runs is not a measurement of ours."""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable

import psutil


def _busy_s() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _own_s() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished children: wrk, bare ORT runs
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class ForeignLoad:
    """Cores used by processes other than ours between start() and stop()."""

    def __init__(self, ours: Callable[[], float] = lambda: 0.0) -> None:
        self._ours = ours  # CPU seconds of our servers (still running, so not in RUSAGE_CHILDREN)

    def start(self) -> None:
        self._t0, self._busy0, self._own0, self._srv0 = time.monotonic(), _busy_s(), _own_s(), self._ours()

    def stop(self) -> float:
        wall = time.monotonic() - self._t0
        ours = (_own_s() - self._own0) + (self._ours() - self._srv0)
        return max(0.0, (_busy_s() - self._busy0 - ours) / max(wall, 1e-6))


def wait_for_quiet(max_cores: float, max_wait_s: float, window_s: float = 3.0) -> float:
    """Wait until others use under `max_cores` over a window (at most `max_wait_s`); returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    while True:
        probe = ForeignLoad()
        probe.start()
        time.sleep(window_s)
        load = probe.stop()
        if load < max_cores or time.monotonic() > deadline:
            return load
        print(f"  waiting for a quieter machine: other processes use {load:.2f} of {os.cpu_count()} cores",
              flush=True)


def add_arguments(ap: argparse.ArgumentParser, *, retries: int, quiet_wait_s: float | None) -> None:
    """The options every wrk bench takes for a shared machine (`quiet_wait_s` None: no wait at the start)."""
    ap.add_argument("--noisy-cores", type=float, default=0.3,
                    help="a run during which other processes used more cores than this is measured again")
    ap.add_argument("--retries", type=int, default=retries, help="extra attempts for a noisy run")
    if quiet_wait_s is not None:
        ap.add_argument("--quiet-wait-s", type=float, default=quiet_wait_s,
                        help="longest wait for a quiet machine at start")
