"""systemd service notification (`Type=notify`) and a self-checking watchdog, in the stable protocol.

The protocol is a datagram of `KEY=VALUE` lines to the AF_UNIX socket named in
`$NOTIFY_SOCKET` (a leading `@` means the abstract namespace); systemd documents
it as stable and ships a self-contained example, so it is written here in a
few lines instead of depending on systemd-python (a C extension) or an
unmaintained wrapper. Without `$NOTIFY_SOCKET` (not under systemd, or
`Type=simple`) every call is a no-op, so the same code runs everywhere.

The watchdog pings at half of `$WATCHDOG_USEC`, from the event loop, and only
after a self-check: the loop itself woke up on time (a blocked loop cannot run
the task at all, and one that was blocked for longer than a ping interval is
sick even if it is free now), and every check the caller supplied (runners
alive, sync coordinator not wedged) passes. A failed check sends no ping and
puts the reason in `STATUS=`, so `systemctl status` shows why systemd is about
to restart the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: A self-check: returns None when healthy, else a short reason a person can read.
Check = Callable[[], "str | None"]


class NotifyError(RuntimeError):
    """The notification socket named in $NOTIFY_SOCKET could not be reached."""


def _address(raw: str) -> str | bytes:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    raise NotifyError(f"NOTIFY_SOCKET={raw!r} is neither an absolute path nor an abstract socket (@name)")


class Notifier:
    """Sends notifications to the service manager; does nothing when there is none."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        self._address = _address(socket_path) if socket_path else None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._warned = False
        #: the last STATUS= the service set itself (the watchdog restores it after an unhealthy spell)
        self.last_status: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """From $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID (the watchdog is ours only if the pid is)."""
        env = os.environ if environ is None else environ
        usec: int | None = None
        raw_usec, raw_pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if raw_usec and raw_usec.isdigit() and (not raw_pid or raw_pid == str(os.getpid())):
            usec = int(raw_usec)
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram (`notify(READY=1, STATUS="...")`); False when there is no service manager.

        A failed send is logged once and otherwise ignored: a service must keep
        serving when the manager's socket is gone (e.g. during its re-exec).
        """
        if self._address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")  # one field per line: a newline would forge a second one
            lines.append(f"{key}={text}")
        try:
            if self._sock is None:
                # Non-blocking: this runs on the event loop, and a dropped ping beats a stalled loop.
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                self._sock = socket.socket(socket.AF_UNIX, kind)
                self._sock.connect(self._address)
            self._sock.sendall("\n".join(lines).encode())
        except OSError as e:
            self.close()
            if not self._warned:
                log.warning("systemd notification failed (%s); continuing without it", e)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self._send_with_status(status, READY=1)

    def status(self, status: str) -> bool:
        self.last_status = status
        return self.notify(STATUS=status)

    def reloading(self, status: str | None = None) -> bool:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload); older ones ignore it.
        return self._send_with_status(status, RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self, status: str | None = None) -> bool:
        return self._send_with_status(status, STOPPING=1)

    def extend_timeout(self, seconds: float, status: str | None = None) -> bool:
        """Ask for `seconds` more before the start (or stop) timeout fires: slow model loads, long drains."""
        return self._send_with_status(status, EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def watchdog_ping(self) -> bool:
        return self.notify(WATCHDOG=1)

    def _send_with_status(self, status: str | None, **fields: str | int) -> bool:
        if status is not None:
            fields["STATUS"] = status
            self.last_status = status
        return self.notify(**fields)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    # ------------------------------------------------------------------ watchdog

    @contextlib.asynccontextmanager
    async def watchdog(self, checks: Sequence[Check] = ()) -> AsyncIterator[Watchdog | None]:
        """Run the self-checking watchdog task while inside; None when systemd asked for no watchdog."""
        if self.watchdog_usec is None or not self.enabled:
            yield None
            return
        dog = Watchdog(self, self.watchdog_usec / 2_000_000, checks)
        task = asyncio.create_task(dog.run(), name="sd-watchdog")
        try:
            yield dog
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Heartbeat:
    """A loop that should tick often records each tick; its check fails when the last one is too old.

    For work loops that wait on something else most of the time (the sync
    coordinator's long-poll), `max_age_s` is the longest silence that is still
    healthy, e.g. the long-poll timeout plus its backoff.
    """

    def __init__(self, name: str, max_age_s: float) -> None:
        self.name = name
        self.max_age_s = max_age_s
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def check(self) -> str | None:
        age = time.monotonic() - self._last
        if age > self.max_age_s:
            return f"{self.name} has not progressed for {age:.0f} s (limit {self.max_age_s:.0f} s)"
        return None


@dataclass
class WatchdogState:
    pings: int = 0
    withheld: int = 0
    last_reason: str | None = None


class Watchdog:
    """Pings every `interval_s` while the loop is on time and every check passes."""

    def __init__(self, notifier: Notifier, interval_s: float, checks: Sequence[Check] = ()) -> None:
        self.notifier = notifier
        self.interval_s = interval_s
        self.checks = list(checks)
        self.state = WatchdogState()

    def add_check(self, check: Check) -> None:
        self.checks.append(check)

    def verdict(self, lag_s: float) -> str | None:
        """Why not to ping now (None: ping). `lag_s`: how late this wake-up came."""
        if lag_s > self.interval_s:
            return f"event loop was blocked for {lag_s:.1f} s"
        for check in self.checks:
            try:
                reason = check()
            except Exception as e:  # a crashing check is a failed one, never a crashed watchdog
                reason = f"self-check {getattr(check, '__name__', check)!r} raised {type(e).__name__}: {e}"
            if reason:
                return reason
        return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            lag = max(0.0, loop.time() - due)
            reason = self.verdict(lag)
            if reason is None:
                self.notifier.watchdog_ping()
                self.state.pings += 1
                if self.state.last_reason is not None:
                    log.info("watchdog: healthy again")
                    self.state.last_reason = None
                    if self.notifier.last_status is not None:
                        self.notifier.notify(STATUS=self.notifier.last_status)
            else:
                self.state.withheld += 1
                if reason != self.state.last_reason:
                    log.error("watchdog: not pinging systemd: %s", reason)
                    self.notifier.notify(STATUS=f"unhealthy: {reason}")
                    self.state.last_reason = reason
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
