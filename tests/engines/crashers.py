"""Targets for the isolation runner that die the way a broken runtime does."""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any


def abort(payload: dict[str, Any]) -> dict[str, Any]:
    os.abort()


def segfault(payload: dict[str, Any]) -> dict[str, Any]:
    ctypes.string_at(0)
    return {}


def hang(payload: dict[str, Any]) -> dict[str, Any]:
    time.sleep(60)
    return {}


def exit_silently(payload: dict[str, Any]) -> dict[str, Any]:
    os._exit(3)


def echo(payload: dict[str, Any]) -> dict[str, Any]:
    return {"echo": payload}


def oom(payload: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("CUDA error: out of memory while allocating 3 GiB")
