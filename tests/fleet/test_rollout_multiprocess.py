"""Two `outpost fleet serve` processes on one PostgreSQL run rollouts driven from the CLI.

Simulated devices talk to both processes; both run a rollout engine. The lease
on each rollout means exactly one process decides at a time: every stage is
assigned and promoted exactly once. `outpost fleet rollout wait` gives CI an
exit code by outcome, and an abort sent to either process rolls back.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections import Counter
from typing import Any

import aiohttp

from tests.conftest import MakeBundle

from .pg import empty_tables
from .procs import fleet_server, outpost
from .sim import FleetLink, Simulation, enroll_fleet


def _bad_on_orin(ref: str, hw: str) -> tuple[float, float, float]:
    return (60.0 if ref == "demo@3.0.0" and hw == "jetson-orin" else 8.0), 0.0, 0.0


async def _cli(*args: str) -> Any:
    return await asyncio.to_thread(outpost, *args, check=False, timeout_s=120)


async def test_two_processes_one_decider_and_ci_exit_codes(
        pg_url: str, tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path],
        make_bundle: MakeBundle) -> None:
    await empty_tables(pg_url)
    data = tmp_path / "shared-data"
    admin = outpost("fleet", "token", "create", "--data", str(data), "--db", pg_url,
                    "--role", "admin").stdout.splitlines()[-1]
    extra = ["--rollout-interval", "0.3s", "--enroll-per-minute", "1000"]
    with fleet_server(data, pg_url, [keypair[1]], extra) as a, fleet_server(data, pg_url, [keypair[1]], extra) as b:
        flags = ["--url", a.url, "--token", admin]
        for v in ("1.0.0", "2.0.0", "3.0.0", "4.0.0"):
            d = make_bundle("mlp", name="demo", version=v, slo_p95_ms=20.0)
            outpost("fleet", "push", str(d), *flags)
        models = {"demo": json.loads(outpost("fleet", "bundles", "--json", *flags).stdout)["bundles"][0]["models"]}
        async with aiohttp.ClientSession() as http:
            link_a, link_b = FleetLink(http, a.url), FleetLink(http, b.url)
            devices = await enroll_fleet(link_a, admin, {"x86-t4": 24, "jetson-orin": 16}, models,
                                         _bad_on_orin, 0.5)
            for i, d in enumerate(devices):
                d.link = link_b if i % 2 else link_a
                status, _ = await link_a._json("PUT", f"/api/v1/devices/{d.device_id}/assignment", admin,
                                               {"bundles": ["demo@1.0.0"]})
                assert status == 200
            sim = Simulation(devices)
            sim.start()
            try:
                stage_flags = ["--stage", "1", "--stage", "10%", "--stage", "100%", "--soak", "0.5s",
                               "--min-requests", "50", "--failure-limit", "0", "--label", "fleet=sim"]
                created = await _cli("fleet", "rollout", "create", "demo@2.0.0", *stage_flags, *flags)
                assert created.returncode == 0, created.stderr
                good = created.stdout.splitlines()[-1]
                waited = await _cli("fleet", "rollout", "wait", good, "--interval", "0.3s", "--timeout", "90s",
                                    "--url", b.url, "--token", admin)
                assert waited.returncode == 0, waited.stderr
                shown = json.loads((await _cli("fleet", "rollout", "show", good, "--json", *flags)).stdout)
                kinds = Counter((e["kind"], e["stage"]) for e in shown["events"] if e["kind"] != "hold")
                assert kinds == Counter({("created", 0): 1, ("assigned", 0): 1, ("promoted", 0): 1,
                                         ("assigned", 1): 1, ("promoted", 1): 1, ("assigned", 2): 1,
                                         ("completed", 2): 1})
                decided_by = {e["actor"] for e in shown["events"] if e["actor"].startswith("engine:")}
                assert len(decided_by) == 1  # one lease holder decided everything

                bad = (await _cli("fleet", "rollout", "create", "demo@3.0.0", *stage_flags, *flags)
                       ).stdout.splitlines()[-1]
                waited = await _cli("fleet", "rollout", "wait", bad, "--interval", "0.3s", "--timeout", "90s",
                                    *flags)
                assert waited.returncode == 1, waited.stderr
                listed = json.loads((await _cli("fleet", "rollout", "list", "--json", *flags)).stdout)["rollouts"]
                assert [(r["bundle"], r["status"]) for r in listed] == [("demo@3.0.0", "rolled_back"),
                                                                        ("demo@2.0.0", "succeeded")]

                # an operator pauses on one process and aborts on the other: the rollout rolls back
                slow = (await _cli("fleet", "rollout", "create", "demo@4.0.0", "--stage", "5", "--stage", "100%",
                                   "--soak", "1h", "--label", "fleet=sim", *flags)).stdout.splitlines()[-1]
                paused = await _cli("fleet", "rollout", "pause", slow, "--url", b.url, "--token", admin)
                assert paused.returncode == 0 and "paused" in paused.stdout
                again = await _cli("fleet", "rollout", "pause", slow, *flags)
                assert again.returncode == 1 and "HTTP 409" in again.stderr and "already paused" in again.stderr
                assert (await _cli("fleet", "rollout", "wait", slow, "--interval", "0.2s", *flags)).returncode == 2
                aborted = await _cli("fleet", "rollout", "abort", slow, *flags)
                assert aborted.returncode == 0 and "aborted" in aborted.stdout
                for _ in range(100):
                    if all(d.active == ["demo@2.0.0"] for d in devices):
                        break
                    await asyncio.sleep(0.2)
                assert {tuple(d.active) for d in devices} == {("demo@2.0.0",)}
                for _ in range(100):  # the rollback's audit event commits right after the assignments
                    status, body = await link_a._json("GET", f"/api/v1/rollouts/{slow}", admin)
                    if body["settled"]:
                        break
                    await asyncio.sleep(0.1)
                assert body["settled"]
                human = (await _cli("fleet", "rollout", "show", slow, *flags)).stdout
                assert "aborted" in human and "rollback_assigned" in human
            finally:
                await sim.stop()
