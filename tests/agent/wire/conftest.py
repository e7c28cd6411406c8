"""A real fleet server on loopback (in process, SQLite) and devices enrolled to it through the agent's client."""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

import bundle
from agent.credentials import Credential
from agent.fleet_client import FleetClient
from fleet.api import FLEET
from fleet.auth import create_operator_token
from fleet.config import ServerConfig
from fleet.server import Running, start


@dataclass
class LiveFleet:
    """The operator's side of a running fleet, driven over its HTTP API."""

    config: ServerConfig
    running: Running | None
    admin: str
    http: aiohttp.ClientSession
    workdir: pathlib.Path

    @property
    def url(self) -> str:
        assert self.running is not None
        return self.running.url

    async def call(self, method: str, path: str, *, json: Any = None, data: Any = None,
                   token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token or self.admin}"}
        async with self.http.request(method, self.url + path, json=json, data=data, headers=headers) as r:
            body = await r.json() if r.content_type == "application/json" else await r.read()
            assert r.status < 300, (method, path, r.status, body)
            return body

    async def enroll_token(self, uses: int = 1, labels: dict[str, str] | None = None) -> str:
        return str((await self.call("POST", "/api/v1/enroll-tokens",
                                    json={"uses": uses, "labels": labels or {}}))["token"])

    async def push(self, bundle_dir: pathlib.Path, compress: bool = True) -> dict[str, Any]:
        out = pathlib.Path(tempfile.mkdtemp(dir=self.workdir)) / ("b.tar.gz" if compress else "b.tar")
        bundle.pack(bundle_dir, out)
        with open(out, "rb") as f:
            return dict(await self.call("POST", "/api/v1/bundles", data=f))

    async def assign(self, device_id: str, refs: list[str]) -> int:
        return int((await self.call("PUT", f"/api/v1/devices/{device_id}/assignment",
                                    json={"bundles": refs}))["serial"])

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.stop()
            self.running = None

    async def restart(self) -> None:
        """Up again on the same port and data (the device's URL and credential stay valid)."""
        assert self.running is None
        self.running = await start(self.config)


@pytest.fixture
async def live_fleet(tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path]) -> AsyncIterator[LiveFleet]:
    data = tmp_path / "fleet"
    config = ServerConfig(data_dir=data, db_url=f"sqlite+aiosqlite:///{tmp_path / 'fleet.db'}", port=0,
                          trust_keys=(keypair[1],), max_bundle_bytes=64 << 20, change_poll_s=0.2)
    running = await start(config)
    port = int(running.url.rsplit(":", 1)[1])
    config = dataclasses.replace(config, port=port)  # a restart comes back on this port
    admin = (await create_operator_token(running.runner.app[FLEET].db, "admin", "wire tests"))[1]
    work = tmp_path / "work"
    work.mkdir()
    async with aiohttp.ClientSession() as http:
        live = LiveFleet(config, running, admin, http, work)
        try:
            yield live
        finally:
            await live.stop()


@pytest.fixture
async def device(live_fleet: LiveFleet) -> AsyncIterator[tuple[FleetClient, Credential]]:
    """A device enrolled through the agent's own client (default aiohttp transport)."""
    token = await live_fleet.enroll_token(labels={"site": "lab"})
    async with FleetClient(live_fleet.url, "", "") as client:
        cred = await client.enroll(token, {"room": "3"}, name="edge-1")
        yield client, cred
