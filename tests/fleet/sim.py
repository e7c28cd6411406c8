"""Simulated devices for rollout tests: the real fleet HTTP API and the real report schema, on loopback.

Each `SimDevice` enrolls, long-polls its signed assignment, "installs" what it is
assigned (at once: the simulation is about the fleet's decisions) and reports a
heartbeat plus one telemetry window per period, with latency and error figures
given by a `Behaviour` of (bundle ref, hardware kind). All HTTP goes through
`FleetLink`, a small seam with the three calls an agent makes (enroll, long-poll
the assignment, post a report): when the device agent's own client
(agent/fleet_client.py, agent/reporter.py) lands, a link built on it replaces
this one and the same scenarios drive the real agent code.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

#: (ref, hardware) -> (p95 ms, error rate, NaN rate)
Behaviour = Callable[[str, str], tuple[float, float, float]]


def steady(_ref: str, _hw: str) -> tuple[float, float, float]:
    return 8.0, 0.0, 0.0


class FleetLink:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url

    async def _json(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, json=body,
                                     headers={"Authorization": f"Bearer {token}"}) as r:
            return r.status, await r.json()

    async def enroll(self, enroll_token: str, name: str, labels: dict[str, str]) -> tuple[str, str]:
        status, body = await self._json("POST", "/api/v1/enroll", enroll_token, {"name": name, "labels": labels})
        assert status == 201, body
        return body["device_id"], body["credential"]

    async def assignment(self, device_id: str, credential: str, serial: int, wait_s: float) -> dict[str, Any]:
        query = f"?serial={serial}&wait_s={wait_s}" if serial >= 0 else ""
        status, body = await self._json("GET", f"/api/v1/devices/{device_id}/assignment{query}", credential)
        assert status == 200, body
        doc: dict[str, Any] = body["document"]
        return doc

    async def report(self, device_id: str, credential: str, report: dict[str, Any]) -> None:
        status, body = await self._json("POST", f"/api/v1/devices/{device_id}/reports", credential, report)
        assert status == 202, body


@dataclass
class SimDevice:
    link: FleetLink
    device_id: str
    credential: str
    hardware: str
    models: dict[str, list[str]]          # bundle name -> model names
    behaviour: Behaviour
    period_s: float
    requests_per_window: int = 50
    #: Engine it reports running each bundle on (a fallback shows as "cpu").
    engine: str = "tensorrt"
    #: Custom metrics per window, as (ref, hardware) -> {metric: value}.
    custom: Callable[[str, str], dict[str, float]] | None = None
    serial: int = -1
    active: list[str] = field(default_factory=list)
    history: list[list[str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _window_start: float = field(default_factory=time.time)

    def heartbeat(self, with_window: bool) -> dict[str, Any]:
        now = time.time()
        report: dict[str, Any] = {
            "agent_version": "0.1.0-sim",
            "hardware": {"gpu_name": self.hardware, "architecture": "aarch64" if "orin" in self.hardware
                         else "x86_64"},
            "bundles": [{"ref": r, "active": True, "engine": self.engine} for r in self.active],
            "health": {"status": "ok"},
        }
        if with_window and self.active:
            models: dict[str, Any] = {}
            n = self.requests_per_window
            for ref in self.active:
                p95, err, nan = self.behaviour(ref, self.hardware)
                for m in self.models.get(ref.partition("@")[0], []):
                    models[m] = {"requests": n, "errors": round(n * err), "nan_count": round(n * nan),
                                 "p50_ms": p95 / 2, "p95_ms": p95, "p99_ms": p95 * 1.3}
                    if self.custom is not None:
                        models[m]["metrics"] = self.custom(ref, self.hardware)
            report["telemetry"] = [{"start": self._window_start, "end": now, "requests": n * len(self.active),
                                    "cpu_percent": 40.0, "memory_bytes": 5e8, "models": models}]
        self._window_start = now
        return report

    async def sync(self) -> None:
        while True:
            doc = await self.link.assignment(self.device_id, self.credential, self.serial, 5.0)
            assert doc["device_id"] == self.device_id and doc["serial"] >= self.serial
            if doc["serial"] != self.serial:
                self.serial = doc["serial"]
                refs = sorted(b["ref"] for b in doc["bundles"])
                if refs != self.active:
                    self.active = refs
                    self.history.append(refs)
                    # a new version: its windows start now, and the fleet hears of it at once
                    await self.link.report(self.device_id, self.credential, self.heartbeat(False))

    async def report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            await self.link.report(self.device_id, self.credential, self.heartbeat(True))

    async def run(self) -> None:
        async def guarded(coro: Any) -> None:
            while True:
                try:
                    await coro()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # fleet restarting: retry like an agent would
                    self.errors.append(repr(e))
                    await asyncio.sleep(0.2)
        await asyncio.gather(guarded(self.sync), guarded(self.report_loop))


class Simulation:
    def __init__(self, devices: list[SimDevice]) -> None:
        self.devices = devices
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(d.run()) for d in self.devices]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def enroll_fleet(link: FleetLink, admin: str, kinds: dict[str, int], models: dict[str, list[str]],
                       behaviour: Behaviour, period_s: float) -> list[SimDevice]:
    """Enroll `kinds[hw]` devices of each hardware kind (label hardware=hw, fleet=sim)."""
    status, tok = await link._json("POST", "/api/v1/enroll-tokens", admin, {"uses": sum(kinds.values())})
    assert status == 201, tok
    out = []
    for hw, count in kinds.items():
        for i in range(count):
            device_id, cred = await link.enroll(tok["token"], f"{hw}-{i}", {"hardware": hw, "fleet": "sim"})
            out.append(SimDevice(link, device_id, cred, hw, models, behaviour, period_s))
    return out
