"""What the daemon tells systemd between READY and STOPPING: STATUS= lines and the watchdog's self-checks.

`systemctl status outpost-agent` shows one line a person can act on: how many
models serve, what the agent is doing (syncing, installing X@V at step S) and
the last error. It is recomposed from live state whenever something changes
(an update step, a sync starting or ending, a switch) and sent only when the
text differs, so the manager's socket sees a handful of datagrams, not one per poll.

The sync coordinator's self-check is a `Heartbeat` the coordinator's loop
feeds at every poll and every update step. Its limit is the longest healthy
silence: the long-poll wait plus the largest backoff while idle, the engine
build allowance while an update step runs (a TensorRT build legitimately
takes minutes; one that takes longer than that is wedged), hours while a
download runs (it has its own stall timeouts; a large bundle on a slow link
is not a wedge). A coordinator task that ended (a bug, not weather) fails
the check at once.

RELOADING=1 is not sent: a version switch is one pointer move with the old
version serving until it, so the service is never between configurations the
way systemd's reload state means (and `systemctl reload` would have nothing
to wait for); the agent does not re-read its configuration on SIGHUP either.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from runtime.sdnotify import Heartbeat, Notifier

from ..commands import LOAD_ALLOWANCE_S
from ..dataplane import DataPlane
from .config import AgentConfig
from .state import AgentState, BundleRecord, StateStore

log = logging.getLogger(__name__)
#: slack on top of long-poll + backoff: the HTTP client's own timeouts, a slow fleet answer
SYNC_SLACK_S = 60.0
MAX_STATUS_CHARS = 400
#: the download step's limit: a big bundle over a slow link takes long, and a stalled download fails
#: by itself (agent.download: per-chunk timeout and minimum rate), so only a hang beyond those is wedged
DOWNLOAD_ALLOWANCE_S = 6 * 3600.0


def sync_idle_limit_s(config: AgentConfig) -> float:
    """The longest healthy silence of the sync loop while no update runs."""
    return config.sync.long_poll_s + config.sync.retry_max_s + SYNC_SLACK_S


class ServiceStatus:
    """Composes the STATUS= line from live state and feeds the sync heartbeat."""

    def __init__(self, notifier: Notifier, dataplane: DataPlane, state: AgentState, config: AgentConfig) -> None:
        self.notifier = notifier
        self.dataplane = dataplane
        self.state = state
        self.idle_limit_s = sync_idle_limit_s(config)
        self.heartbeat = Heartbeat("sync coordinator", self.idle_limit_s)
        self.activity: str | None = None
        self.installing: str | None = None
        self.last_error: str | None = None
        self.sync_task: asyncio.Task[None] | None = None
        self._sent: str | None = None
        self._synced = False

    # -- events ----------------------------------------------------------------------------
    def sync_started(self) -> None:
        self.heartbeat.beat()
        # A long-poll after a good sync is the agent's idle state, not work in progress.
        if self._synced and self.state.serial:
            self.activity = f"in sync with the fleet (assignment serial {self.state.serial})"
        else:
            self.activity = "syncing with the fleet"
        self.refresh()

    def sync_ended(self, error: BaseException | None) -> None:
        self.heartbeat.beat()
        self._synced = error is None
        if error is not None:
            self.last_error = f"sync: {error}" if str(error) else f"sync: {type(error).__name__}"
            self.activity = "syncing with the fleet (retrying)"
        elif self.state.serial:
            self.activity = f"in sync with the fleet (assignment serial {self.state.serial})"
        self.refresh()

    def step(self, record: BundleRecord) -> None:
        """An update step was recorded (or the pending update ended, `record.pending` None)."""
        self.heartbeat.beat()
        p = record.pending
        if p is None:
            self.installing = None
            if record.last_failure:
                f = record.last_failure
                self.last_error = f"{f.get('ref')} refused at {f.get('step')}: {f.get('reason')}"
        else:
            self.installing = f"installing {record.name}@{p.version} at step {p.step}"
            allowance = DOWNLOAD_ALLOWANCE_S if p.step == "prechecked" else LOAD_ALLOWANCE_S
            self.heartbeat.max_age_s = max(self.idle_limit_s, allowance)
        if self.installing is None:
            self.heartbeat.max_age_s = self.idle_limit_s
        self.refresh()

    # -- the line ---------------------------------------------------------------------------
    def text(self) -> str:
        served = [f"{sm.name}@{sm.version}" for sm in self.dataplane.active_models()]
        parts = [f"serving {len(served)} model(s)" + (f": {', '.join(served)}" if served else "")]
        failed = sorted(self.dataplane.failed)
        if failed:
            parts.append(f"not serving {', '.join(failed)}")
        if self.dataplane.draining:
            parts.append("draining")
        doing = self.installing or self.activity
        if doing:
            parts.append(doing)
        error = self.last_error or self.state.last_error
        if error:
            parts.append(f"last error: {error}")
        return "; ".join(parts)[:MAX_STATUS_CHARS]

    def refresh(self) -> None:
        text = self.text()
        if text != self._sent:
            self._sent = text
            self.notifier.status(text)

    # -- self-checks for the watchdog -------------------------------------------------------
    def sync_check(self) -> str | None:
        task = self.sync_task
        if task is not None and task.done():
            if task.cancelled():
                return "sync coordinator was cancelled"
            exc = task.exception()
            return f"sync coordinator stopped: {type(exc).__name__}: {exc}" if exc else "sync coordinator stopped"
        return self.heartbeat.check()

    def runners_check(self) -> str | None:
        """Every served model's runner is open and its batch dispatcher task (once started) still runs."""
        for sm in self.dataplane.active_models():
            if getattr(sm.runner, "_closed", False):
                return f"runner of {sm.name}@{sm.version} is closed while serving"
            worker = getattr(sm.batcher, "_worker", None)
            if isinstance(worker, asyncio.Task) and worker.done():
                return f"batch dispatcher of {sm.name}@{sm.version} has ended"
        return None


class ObservedStore(StateStore):
    """The state store, telling the service status about each update step as it is written."""

    def __init__(self, root: str | os.PathLike[str], on_record: Callable[[BundleRecord], None] | None = None) -> None:
        super().__init__(root)
        self.on_record = on_record
        self._steps: dict[str, str | None] = {}

    def save(self, record: BundleRecord) -> None:
        super().save(record)
        step = record.pending.step if record.pending is not None else None
        previous = self._steps.get(record.name)
        self._steps[record.name] = step
        if step == previous:
            return
        if record.pending is not None:
            version = record.pending.version
            log.info("%s@%s: %s", record.name, version, step,
                     extra={"model": record.name, "version": version, "step": step})
        if self.on_record is not None:
            self.on_record(record)
