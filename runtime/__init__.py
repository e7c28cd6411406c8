"""Process plumbing shared by the agent and the fleet: the event-loop runner and the polling coordinator.

Pure of both products (neither `agent` nor `fleet` is imported here), so each
side uses one copy instead of growing its own.

    run_loop(main, loop_name="auto")        uvloop where installed, else asyncio
    stop_on_signals(event)                  SIGTERM/SIGINT set an asyncio.Event
    Poller(name, poll, interval_s, ...)     poll with backoff; last_success / last_error; logs state changes
    Backoff                                 exponential backoff with full jitter
"""

from .loop import LoopUnavailable, run_loop, stop_on_signals
from .poller import Backoff, Poller, PollerStatus

__all__ = ["Backoff", "LoopUnavailable", "Poller", "PollerStatus", "run_loop", "stop_on_signals"]
