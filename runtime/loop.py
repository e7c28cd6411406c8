"""One way to run a coroutine as a process's main loop, for every command.

uvloop where installed: less event-loop time per request on small models, and
thousands of idle long-poll sockets cost it less. Signal handling is separate
(`stop_on_signals`), so an embedding caller (a test, `outpost up`) keeps its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOPS = ("auto", "asyncio", "uvloop")


class LoopUnavailable(RuntimeError):
    """The event loop asked for by name is not installed."""


def run_loop(main: Coroutine[Any, Any, T], loop_name: str = "auto") -> T:
    """Run `main` to completion on uvloop (auto: when installed) or asyncio."""
    if loop_name not in LOOPS:
        main.close()
        raise LoopUnavailable(f"unknown event loop {loop_name!r}; choose one of {', '.join(LOOPS)}")
    if loop_name != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop_name == "uvloop":
                main.close()
                raise LoopUnavailable("uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def stop_on_signals(stop: asyncio.Event, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Make SIGTERM/SIGINT set `stop` on the running loop (no-op where signals cannot be hooked)."""
    loop = asyncio.get_running_loop()
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
