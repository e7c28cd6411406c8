"""The notify protocol against a real datagram socket, and the self-checking watchdog on a real event loop."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
import uuid

import pytest

from runtime.sdnotify import Heartbeat, Notifier, NotifyError
from tests.systemd.notify_socket import NotifySocket


def test_each_notification_arrives_as_one_datagram(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.path)
    assert n.ready("serving 2 models")
    assert n.status("syncing")
    assert n.reloading()
    assert n.extend_timeout(90, "building engine for mlp@2")
    assert n.watchdog_ping()
    assert n.stopping("draining 3 requests")
    msgs = notify_socket.wait_for("STOPPING")
    got = [m.fields for m in notify_socket.snapshot()]
    assert got[0] == {"READY": "1", "STATUS": "serving 2 models"}
    assert got[1] == {"STATUS": "syncing"}
    assert got[2]["RELOADING"] == "1" and int(got[2]["MONOTONIC_USEC"]) > 0
    assert got[3] == {"EXTEND_TIMEOUT_USEC": "90000000", "STATUS": "building engine for mlp@2"}
    assert got[4] == {"WATCHDOG": "1"}
    assert msgs[0].fields == {"STOPPING": "1", "STATUS": "draining 3 requests"}
    n.close()


def test_a_newline_in_a_status_cannot_forge_another_field(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.path)
    n.status("model evil\nREADY=1")
    (msg,) = notify_socket.wait_for("STATUS")
    assert msg.fields == {"STATUS": "model evil READY=1"}
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"outpost-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        server.settimeout(5)
        n = Notifier("@" + name)
        assert n.ready()
        assert server.recv(1024) == b"READY=1"
        n.close()


def test_without_a_service_manager_everything_is_a_no_op() -> None:
    n = Notifier.from_env({})
    assert not n.enabled and n.watchdog_usec is None
    assert n.ready("x") is False and n.watchdog_ping() is False


def test_relative_socket_path_is_refused() -> None:
    with pytest.raises(NotifyError, match="neither an absolute path"):
        Notifier("notify.sock")


def test_a_vanished_socket_costs_nothing_but_a_warning(notify_socket: NotifySocket,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(notify_socket.path + ".gone")
    assert n.ready() is False
    assert n.status("still here") is False
    assert sum("systemd notification failed" in r.message for r in caplog.records) == 1


def test_watchdog_belongs_to_the_pid_systemd_named() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_usec == 30_000_000
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_usec == 30_000_000
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_usec is None


async def test_watchdog_pings_at_half_the_interval_and_stops_while_the_loop_is_blocked(
        notify_socket: NotifySocket) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "200000"})
    async with n.watchdog() as dog:
        assert dog is not None and dog.interval_s == pytest.approx(0.1)
        await asyncio.sleep(0.55)
        before = len(notify_socket.with_key("WATCHDOG"))
        assert 3 <= before <= 7  # every 0.1 s
        t_block = time.monotonic()
        time.sleep(1.0)  # the event loop is wedged: nothing on it runs
        t_free = time.monotonic()
        await asyncio.sleep(0.5)
    pings = [m.at for m in notify_socket.with_key("WATCHDOG")]
    # Allow 100 ms for a datagram sent just before the block to be read by the receiving thread.
    during = [t for t in pings if t_block + 0.1 < t < t_free]
    assert during == []
    assert dog.state.withheld >= 1  # the first wake-up after the block saw the lag and withheld its ping
    statuses = [m.fields["STATUS"] for m in notify_socket.with_key("STATUS")]
    assert any(re.match(r"unhealthy: event loop was blocked for (0\.9|1\.\d) s", s) for s in statuses)
    assert [t for t in pings if t > t_free]  # pings resume once the loop is healthy again
    n.close()


async def test_a_failing_self_check_withholds_pings_and_says_why(notify_socket: NotifySocket) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "100000"})
    n.ready("serving 1 model")
    runners_alive = threading.Event()
    runners_alive.set()
    sync = Heartbeat("sync coordinator", max_age_s=0.3)

    def runners() -> str | None:
        return None if runners_alive.is_set() else "runner mlp@1 died"

    def boom() -> str | None:
        raise RuntimeError("probe broke")

    async with n.watchdog([runners, sync.check]) as dog:
        assert dog is not None
        for _ in range(5):
            sync.beat()
            await asyncio.sleep(0.05)
        assert dog.state.pings >= 3
        runners_alive.clear()
        pinged = dog.state.pings
        await asyncio.sleep(0.25)
        assert dog.state.pings == pinged and dog.state.withheld >= 3  # sick: nothing sent
        runners_alive.set()
        sync.beat()
        await asyncio.sleep(0.2)
        assert dog.state.pings > pinged  # recovered
        await asyncio.sleep(0.4)  # the sync coordinator stops beating: wedged
        dog.add_check(boom)
        sync.beat()
        await asyncio.sleep(0.2)
    # What was sent is what the socket received, in order.
    notify_socket.wait_for("WATCHDOG", "1", count=dog.state.pings, timeout_s=5)
    assert len(notify_socket.with_key("WATCHDOG")) == dog.state.pings
    statuses = [m.fields["STATUS"] for m in notify_socket.with_key("STATUS")]
    assert "unhealthy: runner mlp@1 died" in statuses
    assert "serving 1 model" in statuses[1:]  # restored after recovering
    assert any(s.startswith("unhealthy: sync coordinator has not progressed") for s in statuses)
    assert any("self-check 'boom' raised RuntimeError: probe broke" in s for s in statuses)
    n.close()


async def test_no_watchdog_task_without_watchdog_usec(notify_socket: NotifySocket) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.path})
    async with n.watchdog() as dog:
        assert dog is None
        await asyncio.sleep(0.1)
    assert notify_socket.with_key("WATCHDOG") == []
