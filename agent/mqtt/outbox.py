"""A bounded queue of messages waiting for the broker to come back.

While the broker is away, replies and presence messages wait here; past
`max_messages` the oldest is dropped and counted, so a long outage costs a
fixed amount of memory and the freshest replies survive. Shared between the
event loop (which adds replies) and paho's network thread (which drains on
connect), hence the lock.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    properties: Any = None  # paho Properties or None


class Outbox:
    def __init__(self, max_messages: int) -> None:
        self.max_messages = max_messages
        self._queue: deque[Outgoing] = deque()
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, msg: Outgoing) -> None:
        with self._lock:
            if len(self._queue) >= self.max_messages:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(msg)

    def put_front(self, msg: Outgoing) -> None:
        """Give back a message that could not be handed over, keeping its place."""
        with self._lock:
            if len(self._queue) >= self.max_messages:
                self.dropped += 1
                return
            self._queue.appendleft(msg)

    def pop(self) -> Outgoing | None:
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def __len__(self) -> int:
        return len(self._queue)
