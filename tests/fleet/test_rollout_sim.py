"""Acceptance: 200 simulated agents on two hardware kinds, real fleet API, PostgreSQL.

The agents are the device agent's own client code (`tests.fleet.sim`): the
real FleetClient on loopback, signed assignments verified by
`contract.verify_assignment`, reports built by `contract.report` and sent by
the agent's Reporter; only the serving figures are simulated.

A good v2 goes through every stage to 100%; a bad v3 (p95 three times the SLO
on one hardware kind only) halts in the first stage that includes that kind,
never reaches more than that stage's slice, and every device that got it is
rolled back. A fleet restarted mid-rollout resumes where it was.
"""

from __future__ import annotations

import asyncio
import pathlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from fleet.api import FLEET
from fleet.auth import create_operator_token
from fleet.config import RolloutConfig
from fleet.server import Running, start
from tests.conftest import MakeBundle

from .conftest import server_config
from .pg import empty_tables
from .sim import FleetLink, SimDevice, Simulation, enroll_fleet

SLO_P95_MS = 20.0
KINDS = {"x86-t4": 120, "jetson-orin": 80}
PERIOD_S = 1.0
FAST = RolloutConfig(eval_interval_s=0.25, lease_s=5.0)
STAGES = [{"devices": 1}, {"percent": 5}, {"percent": 25}, {"percent": 100}]
ENGINE_OF = {"x86-t4": "ort-tensorrt", "jetson-orin": "ort-cuda"}


def behaviour(ref: str, hw: str) -> tuple[float, float, float]:
    if ref == "demo@3.0.0" and hw == "jetson-orin":
        return 3 * SLO_P95_MS, 0.0, 0.0
    return 8.0, 0.0, 0.0


@dataclass
class World:
    link: FleetLink
    admin: str
    devices: list[SimDevice]
    sim: Simulation
    running: Running
    config: Any

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await self.link._json(method, path, self.admin, body)

    async def restart(self) -> None:
        await self.running.stop()
        self.running = await start(self.config)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def world(pg_url: str, tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path],
                make_bundle: MakeBundle) -> AsyncIterator[World]:
    await empty_tables(pg_url)
    config = server_config(tmp_path / "data", pg_url, keypair[1], rollouts=FAST, enroll_attempts_per_minute=1000)
    config = type(config)(**{**config.__dict__, "port": _free_port()})
    running = await start(config)
    world: World | None = None
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            admin = (await create_operator_token(running.runner.app[FLEET].db, "admin", "sim"))[1]
            link = FleetLink(http, running.url)
            for v in ("1.0.0", "2.0.0", "3.0.0"):
                archive = make_bundle("mlp", name="demo", version=v, slo_p95_ms=SLO_P95_MS)
                import bundle
                packed = bundle.pack(archive, tmp_path / f"demo-{v}.tar.gz").read_bytes()
                async with http.post(running.url + "/api/v1/bundles", data=packed,
                                     headers={"Authorization": f"Bearer {admin}"}) as r:
                    assert r.status == 201, await r.text()
                    models = {"demo": (await r.json())["models"]}
            devices = await enroll_fleet(link, admin, KINDS, models, behaviour, PERIOD_S, tmp_path / "agents")
            for d in devices:  # the backend names the agent's runners report (engines.registry)
                d.engine = ENGINE_OF[d.hardware]
            sem = asyncio.Semaphore(16)

            async def assign_v1(d: SimDevice) -> None:
                async with sem:
                    status, body = await link._json("PUT", f"/api/v1/devices/{d.device_id}/assignment", admin,
                                                    {"bundles": ["demo@1.0.0"]})
                    assert status == 200, body
            await asyncio.gather(*(assign_v1(d) for d in devices))
            sim = Simulation(devices)
            sim.start()
            world = World(link, admin, devices, sim, running, config)
            yield world
            await sim.stop()
    finally:
        await (world.running if world else running).stop()


async def _create(w: World, ref: str, soak_s: float = 0.5) -> str:
    status, body = await w.call("POST", "/api/v1/rollouts", {
        "bundle": ref, "selector": {"labels": {"fleet": "sim"}}, "stages": STAGES,
        "soak_s": soak_s, "min_requests": 100,
        # the agent reports backends ("ort-cuda"); the gate must judge their kinds, not fail them
        "gates": {"failure_limit": 0, "allowed_engines": ["tensorrt", "cuda"]}})
    assert status == 201, body
    return str(body["id"])


async def _until_final(w: World, rollout_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    seen_max: dict[int, int] = {}
    while time.monotonic() < deadline:
        status, body = await w.call("GET", f"/api/v1/rollouts/{rollout_id}")
        assert status == 200, body
        seen_max[body["stage"]] = max(seen_max.get(body["stage"], 0), body["devices"])
        if body["settled"]:  # final, and the rollback (if any) assigned
            body["seen_max"] = seen_max
            return dict(body)
        await asyncio.sleep(0.2)
    errors = sorted({e for d in w.devices for e in d.errors})[:5]
    raise AssertionError(f"sim errors {errors}; rollout {rollout_id} still {body['status']} "
                         f"at stage {body['stage']}: {body['reason']}")


async def _settled(w: World, want: str, timeout_s: float = 20) -> None:
    """Every simulated device ends up running exactly `want`, and the fleet assigns it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(d.active == [want] for d in w.devices):
            break
        await asyncio.sleep(0.2)
    assert {tuple(d.active) for d in w.devices} == {(want,)}
    status, body = await w.call("GET", "/api/v1/devices?label=fleet=sim")
    assert status == 200 and len(body["devices"]) == 200
    for d in w.devices:
        status, shown = await w.call("GET", f"/api/v1/devices/{d.device_id}")
        assert shown["assigned"] == [want], (d.device_id, shown["assigned"])
    _agents_sound(w)
    # the fleet keeps what the agent's builders sent: per-model state on the agent's backend, and the serial
    # the agent verified (checked on one device of each kind: 200 more reads would only repeat it)
    for hw in KINDS:
        d = next(d for d in w.devices if d.hardware == hw)
        _, shown = await w.call("GET", f"/api/v1/devices/{d.device_id}")
        state = shown["state"]
        assert [(m["active"], m["backend"]) for m in state["models"]] == [
            (want.partition("@")[2], ENGINE_OF[hw])] * len(state["models"]) and state["models"]
        assert state["hardware"]["gpu_name"] == hw and state["assignment"]["serial"] <= d.serial


def _agents_sound(w: World) -> None:
    """Every agent verified what it acts on, and the fleet accepted every report the agent code built."""
    assert not [r for d in w.devices for r in d.rejected]
    for d in w.devices:
        assert d.assignment is not None and d.trusted is not None
        assert d.trusted.last_serial == d.assignment.serial == d.serial > 0
        assert d.store is not None and d.store.load_agent().serial == d.serial  # what a restarted agent trusts
        assert d.reporter is not None and d.reporter.sent > 0
        assert d.reporter.rejected == 0 and d.reporter.dropped == 0, (d.device_id, d.reporter.last_error)


def _kinds(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["kind"], e["stage"]) for e in events if e["kind"] != "hold"]


async def _good_then_bad(w: World) -> None:
    good = await _until_final(w, await _create(w, "demo@2.0.0"))
    assert good["status"] == "succeeded", good["reason"]
    assert good["devices"] == 200 and [s["devices"] for s in good["stages"]] == [1, 10, 50, 200]
    assert _kinds(good["events"]) == [("created", 0), ("assigned", 0), ("promoted", 0), ("assigned", 1),
                                      ("promoted", 1), ("assigned", 2), ("promoted", 2), ("assigned", 3),
                                      ("completed", 3)], good["events"]
    promoted = [e for e in good["events"] if e["kind"] == "promoted"]
    for e in promoted:  # each decision carries the figures that made it
        assert {r["verdict"] for r in e["detail"]["results"]} == {"pass"}
        assert any(r["gate"] == "p95_ms" and r["threshold"] == SLO_P95_MS for r in e["detail"]["results"])
    # stage 2 (5%) already has both kinds: canaries are spread across hardware
    assigned = [e for e in good["events"] if e["kind"] == "assigned"]
    assert set(assigned[1]["detail"]["by_hardware"]) == set(KINDS)
    await _settled(w, "demo@2.0.0")

    bad = await _until_final(w, await _create(w, "demo@3.0.0"))
    assert bad["status"] == "rolled_back", bad["reason"]
    # the first stage (1 device) holds only the larger kind; the second (5% = 10) adds jetson-orin and halts
    assert bad["stage"] == 1 and "jetson-orin" in bad["reason"] and "p95" in bad["reason"]
    assert max(bad["seen_max"].values()) <= 10 and bad["devices"] == 10
    assert _kinds(bad["events"]) == [("created", 0), ("assigned", 0), ("promoted", 0), ("assigned", 1),
                                     ("halted", 1), ("rollback_assigned", 1)], bad["events"]
    halted = next(e for e in bad["events"] if e["kind"] == "halted")
    failing = [r for r in halted["detail"]["results"] if r["verdict"] == "fail"]
    assert failing and all(r["hardware"] == "jetson-orin" for r in failing)
    p95 = next(r for r in failing if r["gate"] == "p95_ms")
    assert p95["value"] == pytest.approx(3 * SLO_P95_MS) and p95["threshold"] == SLO_P95_MS
    # the good kind's figures, when some arrived before the halt (it may come first from jetson-orin alone)
    if "x86-t4" in halted["detail"]["figures"]:
        assert halted["detail"]["figures"]["x86-t4"]["p95_ms"] == pytest.approx(8.0)
    got_v3 = [d for d in w.devices if any("demo@3.0.0" in h for h in d.history)]
    assert 1 <= len(got_v3) <= 10
    await _settled(w, "demo@2.0.0")  # every device that got v3 runs v2 again
    for d in got_v3:
        assert d.history[-1] == ["demo@2.0.0"]


async def test_good_version_promoted_bad_version_rolled_back(world: World) -> None:
    await _good_then_bad(world)


async def test_fleet_restarted_mid_rollout_resumes(world: World) -> None:
    w = world
    rollout_id = await _create(w, "demo@2.0.0", soak_s=2.0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, body = await w.call("GET", f"/api/v1/rollouts/{rollout_id}")
        if body["stage"] >= 2:
            break
        await asyncio.sleep(0.2)
    before = body["stage"]
    assert before == 2
    await w.restart()
    w.link.url = w.running.url
    final = await _until_final(w, rollout_id)
    assert final["status"] == "succeeded", final["reason"]
    kinds = _kinds(final["events"])
    # no stage repeated, none skipped, each promotion decided once across the restart
    assert [k for k in kinds if k[0] == "promoted"] == [("promoted", 0), ("promoted", 1), ("promoted", 2)]
    assert [k for k in kinds if k[0] == "assigned"] == [("assigned", i) for i in range(4)]
    actors = {e["actor"] for e in final["events"] if e["kind"] in ("promoted", "completed")}
    assert len(actors) == 2  # the engine before the restart, and the one after
    await _settled(w, "demo@2.0.0")


def test_reported_backends_map_to_the_gates_engine_kinds() -> None:
    """The fleet's backend -> kind table (it may not import engines/) agrees with the agent's registry."""
    from engines.registry import BACKENDS, ENGINE_KINDS
    from fleet.rollouts.spec import BACKEND_KINDS, ENGINES

    assert set(BACKEND_KINDS) == set(BACKENDS) and set(ENGINE_KINDS) == set(ENGINES)
    assert {b: kind for kind, backends in ENGINE_KINDS.items() for b in backends} == BACKEND_KINDS


@pytest.mark.parametrize(("backend", "verdict"), [("ort-cuda", "pass"), ("ort-tensorrt", "pass"), ("tensorrt", "pass"),
                                                  ("cuda", "pass"), ("ort-cpu", "fail"), ("cpu", "fail")])
def test_engine_gate_judges_the_agents_backend_by_kind(backend: str, verdict: str) -> None:
    """An agent reports runner backends ("ort-cuda"); a GPU-only gate passes them and fails a CPU fallback."""
    from fleet.rollouts.gates import DeviceStatus, device_gates
    from fleet.rollouts.spec import Gates

    g = Gates(allowed_engines=("tensorrt", "cuda"))
    results = device_gates(g, "jetson-orin", [DeviceStatus("jetson-orin", True, False, False, engine=backend)])
    engine = next(r for r in results if r.gate == "engine")
    assert engine.verdict == verdict, engine
