from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.systemd.notify_socket import NotifySocket


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    s = NotifySocket()
    try:
        yield s
    finally:
        s.close()
