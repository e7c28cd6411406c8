"""Process plumbing shared by the agent and the fleet server (neither imports the other).

Pure of both products (neither `agent` nor `fleet` is imported here), so each
side uses one copy instead of growing its own.

    run_loop(main, loop_name="auto")        uvloop where installed, else asyncio
    stop_on_signals(event)                  SIGTERM/SIGINT set an asyncio.Event
    Poller(name, poll, interval_s, ...)     poll with backoff; last_success / last_error; logs state changes
    Backoff                                 exponential backoff with full jitter

Service-manager plumbing lives beside them: systemd notification and watchdog
(`runtime.sdnotify`), journal logging with secret redaction (`runtime.journal`).
"""

from .loop import LoopUnavailable, run_loop, stop_on_signals
from .poller import Backoff, Poller, PollerStatus

__all__ = ["Backoff", "LoopUnavailable", "Poller", "PollerStatus", "run_loop", "stop_on_signals"]
