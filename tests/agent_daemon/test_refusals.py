"""At the agent: every bad document or bundle installs nothing, is reported with its reason, serving goes on.

The agent runs in-process against a real fleet (a child process) through a
transport that can tamper with what the fleet sends: the agent's one seam
to the network, not a patch of its internals.
"""

from __future__ import annotations

import asyncio
import base64
import json
import pathlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.commands import Lifecycle
from agent.daemon.agent import run_agent
from agent.daemon.config import load
from agent.fleet_client import AiohttpTransport, HttpRequest, HttpResponse
from contract import seal
from fleet.signing import Signer, load_private
from tests.agent_daemon.conftest import Version
from tests.agent_daemon.harness import Agent, Fleet


class TamperingTransport:
    """The real transport, plus switches that turn the fleet's answers into attacks."""

    def __init__(self, base_url: str) -> None:
        self.inner = AiohttpTransport(base_url)
        self.flip_archive_byte = False
        self.rewrite_assignment: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.envelopes: list[dict[str, Any]] = []

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        resp = await self.inner(request)
        if "/archive" in request.path and self.flip_archive_byte:
            return HttpResponse(resp.status, resp.headers, _flip_first(resp.body), resp.close)
        if "/assignment" in request.path and resp.status == 200:
            envelope = json.loads(await resp.aread())
            self.envelopes.append(envelope)
            if self.rewrite_assignment is not None:
                envelope = self.rewrite_assignment(envelope)
            return HttpResponse(200, {"content-type": "application/json"}, _once(json.dumps(envelope).encode()))
        return resp

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _flip_first(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    first = True
    async for chunk in body:
        if first and chunk:
            chunk = bytes([chunk[0] ^ 0x01]) + chunk[1:]
            first = False
        yield chunk


def _doc(envelope: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(base64.b64decode(envelope["payload"])))


async def _until(predicate: Callable[[], Any], timeout_s: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _events(agent: Agent, kind: str) -> list[dict[str, Any]]:
    return [e for e in agent.status()["events"] if e["kind"] == kind]


@pytest.fixture
def fleet(tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path], versions: dict[str, Version]
          ) -> Any:
    f = Fleet(tmp_path / "fleet", keypair[1])
    f.start()
    for v in versions.values():
        f.push(v.archive)
    yield f
    f.stop()


async def test_attacks_install_nothing_and_are_reported(tmp_path: pathlib.Path, fleet: Fleet,
                                                        versions: dict[str, Version],
                                                        keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    agent = Agent(tmp_path / "device", fleet, keypair[1], sync__long_poll_s=2.0)
    config = load(agent.config)
    transport = TamperingTransport(fleet.url)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_agent(config, stop=stop, transport=transport,
                                         lifecycle=Lifecycle(on_ready=lambda *a: ready.set())))
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)

    async def serving(version: str) -> bool:
        v, _ = await asyncio.to_thread(agent.infer, "demo", x)
        return v == version

    def refusal(ref: str, kind: str = "install_refused") -> dict[str, Any] | None:
        return next((e for e in reversed(agent.status()["events"]) if e["kind"] == kind and e.get("ref") == ref),
                    None)

    try:
        await asyncio.wait_for(ready.wait(), 60)
        fleet.assign(agent.device_id, versions["v1"].ref)
        await _until(lambda: agent.status()["models"].get("demo", {}).get("version") == "1.0.0", what="v1")
        floor = agent.status()["bundles"][0]["floor"]
        assert floor == 2

        # 1. tampered download (one bit flipped on the wire): refused on the hash, nothing installed
        transport.flip_archive_byte = True
        fleet.assign(agent.device_id, versions["v2"].ref)
        ev = await _until(lambda: refusal("demo@2.0.0"), what="tampered download refused")
        assert ev["step"] == "download" and "sha256" in ev["reason"]
        assert await serving("1.0.0")
        assert not (config.installs_dir / "demo").joinpath(f"2.0.0-{_digest(versions['v2'])[:16]}").exists()
        transport.flip_archive_byte = False

        # 2. assignment signed by another key (same key id, so the signature itself fails) and by an unknown key
        other = Signer(ec.generate_private_key(ec.SECP256R1()))
        for key_id, error in (("keep", "BadSignature"), ("other", "WrongKey")):
            def resign(env: dict[str, Any], k: str = key_id) -> dict[str, Any]:
                return seal(_doc(env), other.sign, env["key_id"] if k == "keep" else "ab" * 32)

            transport.rewrite_assignment = resign
            fleet.assign(agent.device_id, versions["v1"].ref)  # a fresh serial the agent must refuse
            def rejected(e: str = error) -> bool:
                return any(e in ev["reason"] for ev in _events(agent, "assignment_rejected"))

            await _until(rejected, what=error)
            assert await serving("1.0.0")
        transport.rewrite_assignment = None

        # the genuine v2 now (the same serial re-signed): installs after the tampered try
        fleet.assign(agent.device_id, versions["v2"].ref)
        await _until(lambda: agent.status()["models"].get("demo", {}).get("version") == "2.0.0", what="v2")
        serial = agent.status()["assignment"]["serial"]

        # 3. a replayed older assignment (a genuine document of a lower serial)
        old = next(env for env in transport.envelopes if _doc(env)["serial"] < serial)
        transport.rewrite_assignment = lambda env: old
        fleet.assign(agent.device_id, versions["v1"].ref)
        await _until(lambda: any("Replayed" in e["reason"] for e in _events(agent, "assignment_rejected")),
                     what="replay refused")
        assert await serving("2.0.0") and agent.status()["assignment"]["serial"] == serial

        # 4. an expired document, genuinely signed by the fleet key
        signer = Signer(load_private(fleet.data_dir / "keys" / "assignment.key"))

        def expired(env: dict[str, Any]) -> dict[str, Any]:
            doc = _doc(env)
            doc.update(issued_at=time.time() - 7200, expires_at=time.time() - 3600)
            return seal(doc, signer.sign, env["key_id"])

        transport.rewrite_assignment = expired
        fleet.assign(agent.device_id, versions["v1"].ref)
        await _until(lambda: any("Expired" in e["reason"] for e in _events(agent, "assignment_rejected")),
                     what="expired refused")
        assert await serving("2.0.0")
        transport.rewrite_assignment = None

        # 5. a genuine bundle below the anti-rollback floor (release 1 < 2)
        fleet.assign(agent.device_id, versions["old"].ref)
        ev = await _until(lambda: refusal("demo@0.9.0"), what="floor refusal")
        assert ev["step"] == "verify" and "floor" in ev["reason"]
        assert await serving("2.0.0")

        # 6. a bundle for another architecture
        fleet.assign(agent.device_id, versions["arm"].ref)
        ev = await _until(lambda: refusal("demo@2.1.0"), what="arch refusal")
        assert ev["step"] == "preflight" and "aarch64" in ev["reason"]
        assert await serving("2.0.0")

        # nothing of the refused versions was installed, and the fleet heard every refusal
        installed = sorted(p.name.split("-")[0] for p in (config.installs_dir / "demo").iterdir())
        assert installed == ["1.0.0", "2.0.0"]

        def fleet_events() -> set[str]:
            state = fleet.api("GET", f"/api/v1/devices/{agent.device_id}").get("state") or {}  # (a quick local call)
            return {e["kind"] + ":" + e["step"] for e in state.get("events", [])}

        await _until(lambda: {"install_refused:download", "assignment_rejected:assignment", "install_refused:verify",
                              "install_refused:preflight"} <= fleet_events(), what="events at the fleet")
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30)
        await transport.aclose()


def _digest(v: Version) -> str:
    import bundle
    return bundle.load_unverified(v.dir).digest
