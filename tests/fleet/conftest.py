"""Fixtures of the fleet suite: a real fleet server on a free loopback port, on SQLite and on PostgreSQL.

Every API test runs twice (`backend` is "sqlite" or "postgresql"). The
PostgreSQL database is created once per session (see `pg.py`) and emptied
before each test; SQLite gets a new file per test.
"""

from __future__ import annotations

import io
import pathlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

import bundle
from fleet.api import FLEET
from fleet.auth import create_operator_token
from fleet.config import ServerConfig
from fleet.server import Running, start
from fleet.service import Fleet

from .pg import empty_tables, postgres_database

BACKENDS = ["sqlite", "postgresql"]
MAX_BUNDLE_BYTES = 4 << 20
CHANGE_POLL_S = 0.2


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'fleet.db'}"
    url: str = request.getfixturevalue("pg_url")
    await empty_tables(url)
    return url


@dataclass
class Response:
    status: int
    body: Any
    headers: Any = None
    raw: bytes = b""


@dataclass
class Harness:
    url: str
    running: Running
    http: aiohttp.ClientSession
    admin: str
    workdir: pathlib.Path
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def fleet(self) -> Fleet:
        return self.running.runner.app[FLEET]

    async def token(self, role: str) -> str:
        if role not in self.tokens:
            self.tokens[role] = (await create_operator_token(self.fleet.db, role, f"test {role}"))[1]
        return self.tokens[role]

    async def call(self, method: str, path: str, token: str | None = None, *, json: Any = None,
                   data: Any = None, headers: dict[str, str] | None = None) -> Response:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if isinstance(data, bytes):
            data = io.BytesIO(data)  # streamed, as a device or the CLI would send it
        async with self.http.request(method, self.url + path, json=json, data=data, headers=h) as r:
            raw = await r.read()
            body: Any = None
            if r.content_type == "application/json":
                body = await r.json()
            return Response(r.status, body, r.headers, raw)

    async def enroll(self, name: str = "dev", labels: dict[str, str] | None = None, uses: int = 1) -> tuple[str, str]:
        r = await self.call("POST", "/api/v1/enroll-tokens", self.admin, json={"uses": uses})
        assert r.status == 201, r.body
        r = await self.call("POST", "/api/v1/enroll", r.body["token"], json={"name": name, "labels": labels or {}})
        assert r.status == 201, r.body
        return r.body["device_id"], r.body["credential"]

    def pack(self, bundle_dir: pathlib.Path) -> pathlib.Path:
        out = pathlib.Path(tempfile.mkdtemp(dir=self.workdir)) / "bundle.tar.gz"
        return bundle.pack(bundle_dir, out)

    async def push(self, bundle_dir: pathlib.Path, token: str | None = None) -> Response:
        return await self.call("POST", "/api/v1/bundles", token or self.admin,
                               data=self.pack(bundle_dir).read_bytes())


def server_config(data_dir: pathlib.Path, db_url: str, trust: pathlib.Path, **overrides: Any) -> ServerConfig:
    return ServerConfig(data_dir=data_dir, db_url=db_url, port=0, trust_keys=(trust,),
                        max_bundle_bytes=MAX_BUNDLE_BYTES, change_poll_s=CHANGE_POLL_S, **overrides)


@pytest.fixture
async def api(db_url: str, tmp_path: pathlib.Path,
              keypair: tuple[pathlib.Path, pathlib.Path]) -> AsyncIterator[Harness]:
    running = await start(server_config(tmp_path / "data", db_url, keypair[1]))
    try:
        async with aiohttp.ClientSession() as http:
            admin = (await create_operator_token(running.runner.app[FLEET].db, "admin", "test admin"))[1]
            work = tmp_path / "work"
            work.mkdir()
            yield Harness(running.url, running, http, admin, work)
    finally:
        await running.stop()
