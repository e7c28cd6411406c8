"""One decider per rollout: leases and compare-and-swap between engines on one database (both backends)."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import update

from fleet.config import RolloutConfig
from fleet.db import Rollout
from fleet.rollouts import RolloutEngine
from fleet.rollouts.store import Stale, cas
from fleet.service import Fleet
from tests.conftest import MakeBundle

from .conftest import server_config


@pytest.fixture
async def fleet(db_url: str, tmp_path: pathlib.Path, keypair: tuple[pathlib.Path, pathlib.Path]
                ) -> AsyncIterator[Fleet]:
    f = await Fleet.open(server_config(tmp_path / "data", db_url, keypair[1]))
    try:
        yield f
    finally:
        await f.close()


async def test_one_lease_holder_and_stale_writes_are_refused(fleet: Fleet, make_bundle: MakeBundle,
                                                             tmp_path: pathlib.Path) -> None:
    import bundle
    archive = bundle.pack(make_bundle("mlp", name="demo", version="1.0.0"), tmp_path / "a.tar.gz")
    upload = fleet.blobs.begin_upload()
    upload.write(archive.read_bytes())
    await fleet.bundles.push(upload, upload.finish(), "test")

    config = RolloutConfig(eval_interval_s=0.1, lease_s=0.5)
    a = RolloutEngine(fleet.db, fleet.assignments, config, owner="A")
    b = RolloutEngine(fleet.db, fleet.assignments, config, owner="B")
    r = await a.store.create({"bundle": "demo@1.0.0", "stages": [{"percent": 100}]}, "op")
    assert await a.store.claim("A", config.lease_s) == [r.id]
    assert await b.store.claim("B", config.lease_s) == []          # held by A
    assert await a.store.claim("A", config.lease_s) == [r.id]      # A renews
    await b.step(r.id)                                              # B does nothing without the lease
    assert (await b.store.events(r.id))[-1].kind == "created"
    await asyncio.sleep(0.6)                                        # A stops renewing (crashed)
    assert await b.store.claim("B", config.lease_s) == [r.id]
    assert await a.store.claim("A", config.lease_s) == []

    # a write that read an older version changes nothing
    current = await a.store.get(r.id)
    async with fleet.db.transaction() as s:
        await cas(s, r.id, current.version, reason="first")
    with pytest.raises(Stale):
        async with fleet.db.transaction() as s:
            await cas(s, r.id, current.version, reason="second")
    assert (await a.store.get(r.id)).reason == "first"

    # an operator's pause wins over an engine decision taken on the state before it
    paused = await a.store.act(r.id, "pause", "op")
    assert paused.status == "paused"
    with pytest.raises(Stale):
        async with fleet.db.transaction() as s:
            await cas(s, r.id, current.version + 1, status="succeeded")
    assert (await a.store.get(r.id)).status == "paused"
    await b.store.release("B")
    async with fleet.db.transaction() as s:
        await s.execute(update(Rollout).values(lease_owner=None))
    assert await a.store.claim("A", config.lease_s) == [r.id]
