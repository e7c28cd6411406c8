"""Faults with real processes: the fleet gone, the agent killed mid-update, a version that crash-loops the agent."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import random
import time
from typing import Any

import numpy as np
import pytest

import bundle
from agent.daemon.state import STEPS
from tests.agent_daemon.conftest import Version, make_version
from tests.agent_daemon.harness import Agent, Fleet, http, running
from tests.models.make_models import mlp

KILL_CYCLES = int(os.environ.get("OUTPOST_TEST_KILL_CYCLES", "50"))
#: the recorded step after which a kill may be aimed: during download, install, build, gate, switch, commit
KILL_AFTER = ("prechecked", "downloaded", "installed", "built", "gated", "switched")
X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)


def test_fleet_down_serving_continues_and_buffered_reports_arrive(
        tmp_path: pathlib.Path, versions: dict[str, Version], keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    fleet = Fleet(tmp_path / "fleet", keypair[1])
    fleet.start()
    agent = Agent(tmp_path / "device", fleet, keypair[1], sync__report_period_s=0.5)
    with running(fleet, agent):
        fleet.push(versions["v1"].archive)
        agent.start()
        fleet.assign(agent.device_id, versions["v1"].ref)
        agent.wait_serving("demo", "1.0.0")
        fleet.stop()
        down_from = time.time()
        answered = 0
        while time.time() - down_from < 4.0:
            version, y = agent.infer("demo", X)
            assert version == "1.0.0"
            np.testing.assert_allclose(y, versions["v1"].expect(X), rtol=1e-5)
            answered += 1
        down_until = time.time()
        assert agent.status()["last_error"], "the agent did not notice the fleet was gone"
        fleet.start()  # same port, same data

        def outage_points() -> list[Any]:
            _, doc = http("GET", f"{fleet.url}/api/v1/devices/{agent.device_id}/telemetry?since={down_from + 0.5}"
                                 f"&until={down_until - 0.5}", token=fleet.token)
            return list(doc["points"]) if isinstance(doc, dict) else []

        deadline = time.monotonic() + 30
        while len(outage_points()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        points = outage_points()
        assert len(points) >= 3, points  # heartbeats built during the outage, delivered after it
        assert sum(p["metrics"].get("requests", 0) for p in points) > 0
        assert answered > 10
        assert agent.stop() == 0


def test_a_version_that_crashes_the_agent_at_start_is_reverted_without_the_fleet(
        tmp_path: pathlib.Path, versions: dict[str, Version], keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    fleet = Fleet(tmp_path / "fleet", keypair[1])
    fleet.start()
    agent = Agent(tmp_path / "device", fleet, keypair[1], update__max_failed_starts=3)
    with running(fleet, agent):
        for v in ("v1", "v2"):
            fleet.push(versions[v].archive)
        agent.start()
        fleet.assign(agent.device_id, versions["v1"].ref)
        agent.wait_serving("demo", "1.0.0")
        fleet.assign(agent.device_id, versions["v2"].ref)
        agent.wait_serving("demo", "2.0.0")
        assert agent.stop() == 0
        fleet.stop()  # no network from here on

        crash = {"OUTPOST_AGENT_FAULTS": "load:demo@2.0.0=kill"}
        for attempt in range(1, 4):
            proc = agent.start(env=crash, wait=False)
            rc = proc.proc.wait(timeout=60)
            proc.stop()
            assert rc == -9, f"start {attempt} did not crash:\n{proc.output}"
            assert agent.status()["bundles"][0]["failed_starts"] == attempt
        agent.start(env=crash)  # the 4th start reverts before loading: nothing left to crash on
        version, y = agent.infer("demo", X)
        assert version == "1.0.0"
        np.testing.assert_allclose(y, versions["v1"].expect(X), rtol=1e-5)
        st = agent.status()
        (rec,) = st["bundles"]
        assert rec["active"] == "1.0.0" and rec["last_known_good"] is None
        assert any("crash loop" in reason for reason in rec["refused"].values())
        assert any(e["kind"] == "reverted" for e in st["events"])
        assert agent.stop() == 0


def _check_consistent(agent: Agent, by_version: dict[str, Version], trust: list[bundle.TrustAnchor]) -> str:
    """Exactly one complete, verified version active, serving its own answers.

    The restarted agent resumes the interrupted update at once, so the check
    is retried when a switch lands between its reads (the state it checks is
    then the newer one, checked the same way).
    """
    for _ in range(20):
        before = agent.status()["bundles"][0]
        _, meta = http("GET", f"{agent.url}/v2/models/demo")
        version, y = agent.infer("demo", X)
        after = agent.status()["bundles"][0]
        if not (before["active"] == after["active"] == version and meta["versions"] == [version]):
            time.sleep(0.1)
            continue
        assert version in by_version, after
        np.testing.assert_allclose(y, by_version[version].expect(X), rtol=1e-5)
        install = agent.root / "state" / "installs" / "demo"
        (path,) = [p for p in install.iterdir() if p.name == f"{version}-{after['active_digest'][:16]}"]
        vb = bundle.verify(path, trust)
        assert vb.digest == after["active_digest"] and vb.manifest.version == version
        assert all(p.stat().st_mode & 0o222 == 0 for p in path.rglob("*") if p.is_file())
        return str(version)
    raise AssertionError(f"no consistent view of the active version: {before} / {after} / {meta}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_at_random_points_of_updates_leaves_one_complete_verified_version(
        tmp_path: pathlib.Path, versions: dict[str, Version], keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    rng = random.Random(int(os.environ.get("OUTPOST_TEST_SEED", "10")))
    v4 = make_version(tmp_path, keypair[0], "demo", "4.0.0", mlp(seed=4), release=2)
    rotation = [versions["v1"], versions["v2"], v4]
    by_version = {v.version: v for v in rotation}
    trust = bundle.anchors([keypair[1]])
    fleet = Fleet(tmp_path / "fleet", keypair[1])
    fleet.start()
    # retain_versions = 0: the version assigned next was collected, so each update downloads and installs again
    agent = Agent(tmp_path / "device", fleet, keypair[1], update__retain_versions=0, update__health_runs=2,
                  update__stable_after_s=0.2, sync__report_period_s=5.0)
    with running(fleet, agent):
        for v in rotation:
            fleet.push(v.archive)
        agent.start()
        record = agent.root / "state" / "bundles" / "demo.json"

        def step_of(version: str) -> str | None:
            """How far the update to `version` got: its last recorded step, "done", or None (not begun)."""
            try:
                doc = json.loads(record.read_text())
            except (OSError, ValueError):
                return None
            pending, active = doc.get("pending"), doc.get("active")
            if pending and pending["version"] == version:
                return str(pending["step"])
            return "done" if active and active["version"] == version else None

        def reach(version: str, step: str) -> None:
            """Wait until the update has recorded `step` (or gone past it); at most 30 s."""
            order = (*STEPS, "done")
            deadline = time.monotonic() + 30
            while True:
                now = step_of(version)
                if now is not None and order.index(now) >= order.index(step):
                    return
                assert time.monotonic() < deadline, (f"the update to {version} never reached {step}: "
                                                     f"{record.read_text()}\n{agent.proc.output if agent.proc else ''}")
                time.sleep(0.002)

        # every engine built once: from here on each update downloads and installs (the version assigned
        # next was collected) but finds its engine in the cache
        for first in rotation:
            fleet.assign(agent.device_id, first.ref)
            agent.wait_serving("demo", first.version)
        killed_at: collections.Counter[str] = collections.Counter()
        cycle = 0
        # Each kill point: a random step of the lifecycle's steps 3-8 (download .. commit) is awaited, then a
        # random 0-10 ms more (on a quiet machine the steps after "built" take only tens of ms, so a longer
        # wait mostly lands after the commit). Repeated until KILL_CYCLES kills landed inside an update (a kill
        # after the commit is still a restart and a check).
        while sum(n for k, n in killed_at.items() if k != "idle") < KILL_CYCLES and cycle < 4 * KILL_CYCLES:
            cycle += 1
            target = rotation[cycle % len(rotation)]
            fleet.assign(agent.device_id, target.ref)
            reach(target.version, rng.choice(KILL_AFTER))
            time.sleep(rng.uniform(0.0, 0.01))
            agent.kill()
            pending = json.loads(record.read_text()).get("pending")
            killed_at[pending["step"] if pending else "idle"] += 1
            agent.start()
            _check_consistent(agent, by_version, trust)
        # the kills landed inside the update, across its steps (not only before or after it)
        inside = {k for k in killed_at if k != "idle"}
        assert len(inside) >= 4 and sum(killed_at[k] for k in inside) >= KILL_CYCLES, killed_at
        final = rotation[(cycle + 1) % len(rotation)]
        fleet.assign(agent.device_id, final.ref)
        agent.wait_serving("demo", final.version)
        assert _check_consistent(agent, by_version, trust) == final.version
        print(f"kill points by last recorded step: {dict(killed_at)} in {cycle} cycles")
        assert agent.stop() == 0
