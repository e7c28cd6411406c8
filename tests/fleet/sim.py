"""Simulated devices for rollout tests: the real fleet, the real agent's client code, on loopback.

Each `SimDevice` is the device agent minus its data plane: it enrolls with
`agent.fleet_client.FleetClient` (the real aiohttp transport, on one session
shared by every simulated device), long-polls its signed assignment and
verifies it with `contract.verify_assignment` against the fleet key it fetched
and its own trusted state (highest serial accepted, persisted with the agent's
`StateStore` when the fleet is enrolled with a state root), "installs" what
it is assigned at once (the simulation is about the fleet's decisions, so
there is no download or engine build), and reports
through `agent.reporter.Reporter` with reports made by `contract.report`'s
builders. Only the serving is simulated: each telemetry window's per-model
latency, error and NaN figures come from a `Behaviour` of (bundle ref,
hardware kind).

`FleetLink` is the test's side of the wire: the shared HTTP session, the
fleet's URL (a device reads it at every request, so a restarted fleet or a
device moved to another fleet process is followed), operator calls, and the
agent-side calls a device makes, each through that device's `FleetClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from agent.daemon.state import AgentState, StateStore
from agent.fleet_client import AiohttpTransport, FleetClient
from agent.reporter import Reporter
from contract import (
    Assignment,
    AssignmentRejected,
    AssignmentState,
    Health,
    ModelState,
    ModelStats,
    TelemetryWindow,
    build_report,
    verify_assignment,
)
from runtime import Backoff, Poller

#: (ref, hardware) -> (p95 ms, error rate, NaN rate)
Behaviour = Callable[[str, str], tuple[float, float, float]]
AGENT_VERSION = "0.1.0-sim"
LONG_POLL_S = 5.0
#: the agent's sync backoff (retry_base_s 1 s, retry_max_s 60 s) scaled to the simulation's 1 s report period
SYNC_BACKOFF = Backoff(0.25, 4.0)
log = logging.getLogger(__name__)


def steady(_ref: str, _hw: str) -> tuple[float, float, float]:
    return 8.0, 0.0, 0.0


class LinkTransport(AiohttpTransport):
    """The agent's real aiohttp transport, on the link's shared session and current URL.

    One session (and connector) for hundreds of simulated agents keeps the
    simulation's sockets and file descriptors bounded; everything else (headers,
    no redirects, error translation) is the agent's own code path.
    """

    def __init__(self, link: FleetLink) -> None:
        super().__init__(link.url)
        self.link = link

    def _open(self) -> aiohttp.ClientSession:
        self.base_url = self.link.url.rstrip("/")
        return self.link.http

    async def aclose(self) -> None:
        return None  # the session belongs to the test


class FleetLink:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.transport = LinkTransport(self)
        self._clients: dict[str, FleetClient] = {}

    async def _json(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        """An operator's call (the agent code makes the devices' calls)."""
        async with self.http.request(method, self.url + path, json=body,
                                     headers={"Authorization": f"Bearer {token}"}) as r:
            return r.status, await r.json()

    def client(self, device_id: str, credential: str) -> FleetClient:
        """The device's real fleet client over this link (one per device, all on the shared session)."""
        c = self._clients.get(device_id)
        if c is None:
            c = self._clients[device_id] = FleetClient(self.url, device_id, credential, self.transport,
                                                       timeout_s=10.0)
        return c

    async def enroll(self, enroll_token: str, name: str, labels: dict[str, str]) -> tuple[str, str]:
        cred = await FleetClient(self.url, "", "", self.transport).enroll(enroll_token, labels, name)
        return cred.device_id, cred.secret

    async def fleet_key(self, device_id: str, credential: str) -> bytes:
        return await self.client(device_id, credential).fleet_key()

    async def assignment(self, device_id: str, credential: str, serial: int | None,
                         wait_s: float) -> dict[str, Any]:
        """The signed envelope, as the agent's long-poll gets it (verification is the device's job)."""
        return await self.client(device_id, credential).poll_assignment(serial, wait_s)

    async def report(self, device_id: str, credential: str, report: dict[str, Any]) -> None:
        await self.client(device_id, credential).send_report(report)


@dataclass
class SimDevice:
    link: FleetLink
    device_id: str
    credential: str
    hardware: str
    models: dict[str, list[str]]          # bundle name -> model names
    behaviour: Behaviour
    period_s: float
    #: the fleet's assignment key, fetched at enrollment (the agent's trust-on-first-use configuration)
    fleet_key: bytes = b""
    requests_per_window: int = 50
    #: Backend it reports running each bundle on (an engines.registry name; a CPU fallback shows as "ort-cpu").
    engine: str = "ort-tensorrt"
    #: Custom metrics per window, as (ref, hardware) -> {metric: value}.
    custom: Callable[[str, str], dict[str, float]] | None = None
    #: what this device trusts: the highest serial it accepted, persisted in `store` (the agent's own state
    #: store, atomic writes) when one is given, and loaded from it on start
    trusted: AssignmentState | None = None
    store: StateStore | None = None
    assignment: Assignment | None = None
    active: list[str] = field(default_factory=list)
    #: model name -> version it ran before the current one (the report's last_known_good)
    previous: dict[str, str] = field(default_factory=dict)
    history: list[list[str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: assignments the device refused (bad signature, replayed serial, foreign, expired): none expected
    rejected: list[str] = field(default_factory=list)
    reporter: Reporter | None = None
    _window_start: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.trusted is None:
            self.trusted = AssignmentState.initial(self.device_id)

    @property
    def serial(self) -> int:
        """The serial of the last verified assignment (-1 before the first)."""
        return self.assignment.serial if self.assignment is not None else -1

    async def send_report(self, report: Mapping[str, Any]) -> None:
        """The Reporter's sink: the device's FleetClient, through the link (so a test can watch reports)."""
        await self.link.report(self.device_id, self.credential, dict(report))

    # --- the simulated data plane's figures, in the report schema ---

    def _hardware(self) -> dict[str, Any]:
        return {"gpu_name": self.hardware, "architecture": "aarch64" if "orin" in self.hardware else "x86_64"}

    def _served(self) -> list[tuple[str, str, str]]:
        """(ref, model name, version) of every model served now."""
        out: list[tuple[str, str, str]] = []
        for ref in self.active:
            name, _, version = ref.partition("@")
            out.extend((ref, m, version) for m in self.models.get(name, []))
        return out

    def _stats(self, ref: str) -> ModelStats:
        n = self.requests_per_window
        p95, err, nan = self.behaviour(ref, self.hardware)
        custom = self.custom(ref, self.hardware) if self.custom is not None else {}
        return ModelStats(requests=n, errors=round(n * err), nan_count=round(n * nan), p50_ms=p95 / 2,
                          p95_ms=p95, p99_ms=p95 * 1.3, metrics=custom)

    def build(self, with_window: bool = True) -> dict[str, Any]:
        """One heartbeat, built as the agent's ReportBuilder does (contract.report builders, validated)."""
        now = time.time()
        served = self._served()
        stats = {m: self._stats(ref) for ref, m, _ in served} if with_window else {}
        models = [ModelState(name=m, active=version, last_known_good=self.previous.get(m), backend=self.engine,
                             health=Health("ok"), stats=stats.get(m)) for _, m, version in served]
        windows = []
        if with_window and served:
            windows.append(TelemetryWindow(start=self._window_start, end=now,
                                           requests=sum(s.requests for s in stats.values()),
                                           errors=sum(s.errors for s in stats.values()),
                                           system={"cpu_percent": 40.0, "memory_bytes": 5e8}, models=stats))
        self._window_start = now
        a = self.assignment
        return build_report(
            agent_version=AGENT_VERSION, time=now, hardware=self._hardware(),
            bundles=[{"ref": r, "active": True, "engine": self.engine} for r in self.active],
            models=models, health=Health("ok"),
            assignment={"serial": a.serial, "expires_at": a.expires_at} if a is not None else None,
            telemetry=windows)

    # --- the agent's loops ---

    async def sync_step(self) -> None:
        """One step of the sync coordinator (agent/daemon/sync.py), with an instant install.

        Long-poll (the first one asks at once, later ones name the serial held),
        verify against the fleet key and the trusted state, then switch.
        """
        assert self.trusted is not None and self.reporter is not None
        known = self.trusted.last_serial if self.assignment is not None else None
        try:
            envelope = await self.link.assignment(self.device_id, self.credential, known, LONG_POLL_S)
        except Exception as e:  # fleet restarting or shedding: the Poller backs off like the agent's
            self.errors.append(repr(e))
            raise
        try:
            accepted = verify_assignment(envelope, self.fleet_key, self.trusted, time.time())
        except AssignmentRejected as e:
            self.rejected.append(f"{type(e).__name__}: {e}")
            raise
        before, self.trusted = self.trusted, self.trusted.after(accepted)
        self.assignment = accepted
        if self.store is not None and self.trusted.last_serial != before.last_serial:
            # persisted before acting on it, as the sync coordinator does (only on a new serial here: the
            # same serial re-signed after every idle long-poll would cost 200 fsyncs every few seconds)
            await asyncio.to_thread(self.store.save_agent, AgentState(
                device_id=self.device_id, serial=self.trusted.last_serial, issued_at=self.trusted.last_issued_at,
                expires_at=accepted.expires_at, last_sync=time.time()))
        revoked = set(accepted.revoked)
        refs = sorted(b.ref for b in accepted.bundles if not b.revoked and b.ref not in revoked)
        if refs != self.active:
            for _, m, version in self._served():
                self.previous[m] = version
            self.active = refs
            self.history.append(refs)
            # a new version: its windows start now, and the fleet hears of it at once
            self.reporter.enqueue(self.build(with_window=False))
            await self.reporter.flush()

    async def run(self) -> None:
        if self.store is not None:
            saved = await asyncio.to_thread(self.store.load_agent)
            if saved.device_id == self.device_id:
                self.trusted = AssignmentState(self.device_id, saved.serial, saved.issued_at)
        while not self.fleet_key:
            try:
                self.fleet_key = await self.link.fleet_key(self.device_id, self.credential)
            except Exception as e:
                self.errors.append(repr(e))
                await asyncio.sleep(SYNC_BACKOFF.delay_s(0))
        self.reporter = Reporter(self, self.build, period_s=self.period_s)
        # the agent's poll loop: a long-poll right after the last, full-jitter backoff after a failure
        sync = Poller(f"sim sync {self.device_id}", self.sync_step, 0.0, backoff=SYNC_BACKOFF, logger=log)

        async def report_loop() -> None:
            assert self.reporter is not None
            await asyncio.sleep(self.period_s)  # the first window is a whole period long
            await self.reporter.run()
        await asyncio.gather(sync.run(), report_loop())


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
                       behaviour: Behaviour, period_s: float,
                       state_root: pathlib.Path | None = None) -> list[SimDevice]:
    """Enroll `kinds[hw]` devices of each hardware kind (label hardware=hw, fleet=sim) with the agent's client.

    With `state_root`, each device persists its trusted state under ``state_root/<device id>``.
    """
    status, tok = await link._json("POST", "/api/v1/enroll-tokens", admin, {"uses": sum(kinds.values())})
    assert status == 201, tok
    out = []
    key = b""
    for hw, count in kinds.items():
        for i in range(count):
            device_id, cred = await link.enroll(tok["token"], f"{hw}-{i}", {"hardware": hw, "fleet": "sim"})
            if not key:
                key = await link.fleet_key(device_id, cred)
            store = StateStore(state_root / device_id) if state_root is not None else None
            out.append(SimDevice(link, device_id, cred, hw, models, behaviour, period_s, fleet_key=key,
                                 store=store))
    return out
