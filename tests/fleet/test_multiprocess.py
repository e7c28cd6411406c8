"""Two `outpost fleet serve` processes on one PostgreSQL: same state, no corruption under races."""

from __future__ import annotations

import asyncio
import io
import json
import pathlib
from typing import Any

import aiohttp
import pytest

import bundle
from tests.conftest import MakeBundle

from .pg import empty_tables
from .procs import fleet_server, outpost


async def _call(http: aiohttp.ClientSession, method: str, url: str, token: str, *, json_body: Any = None,
                data: bytes | None = None) -> tuple[int, Any]:
    async with http.request(method, url, json=json_body, data=io.BytesIO(data) if data is not None else None,
                            headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json()


@pytest.fixture
async def two_fleets(pg_url: str, tmp_path: pathlib.Path,
                     keypair: tuple[pathlib.Path, pathlib.Path]) -> Any:
    await empty_tables(pg_url)
    data = tmp_path / "shared-data"
    admin = outpost("fleet", "token", "create", "--data", str(data), "--db", pg_url,
                    "--role", "admin").stdout.splitlines()[-1]
    with fleet_server(data, pg_url, [keypair[1]]) as a, fleet_server(data, pg_url, [keypair[1]]) as b:
        yield a.url, b.url, admin


async def test_concurrent_pushes_of_one_version(two_fleets: tuple[str, str, str], make_bundle: MakeBundle,
                                                tmp_path: pathlib.Path) -> None:
    url_a, url_b, admin = two_fleets
    same = bundle.pack(make_bundle("mlp", name="demo", version="1.0.0"), tmp_path / "same.tar.gz").read_bytes()
    x = bundle.pack(make_bundle("mlp", name="race", version="1.0.0"), tmp_path / "x.tar.gz").read_bytes()
    y = bundle.pack(make_bundle("cnn", name="race", version="1.0.0"), tmp_path / "y.tar.gz").read_bytes()
    async with aiohttp.ClientSession() as http:
        urls = [url_a, url_b] * 3
        same_results = await asyncio.gather(*(_call(http, "POST", f"{u}/api/v1/bundles", admin, data=same)
                                              for u in urls))
        assert sorted(s for s, _ in same_results) == [200] * 5 + [201]
        assert len({body["digest"] for _, body in same_results}) == 1

        contenders = [(url_a, x), (url_b, y)] * 3
        race = await asyncio.gather(*(_call(http, "POST", f"{u}/api/v1/bundles", admin, data=d)
                                      for u, d in contenders))
        winners = {body["digest"] for s, body in race if s in (200, 201)}
        assert len(winners) == 1 and sorted(s for s, _ in race).count(201) == 1
        assert sorted(s for s, _ in race) == [200, 200, 201, 409, 409, 409]
        # both processes see one version of each, with the winner's content
        (winner,) = winners
        for u in (url_a, url_b):
            _, listed = await _call(http, "GET", f"{u}/api/v1/bundles", admin)
            assert [b["ref"] for b in listed["bundles"]] == ["demo@1.0.0", "race@1.0.0"]
            assert listed["bundles"][1]["digest"] == winner


async def test_concurrent_assignment_changes_and_cross_process_long_poll(
        two_fleets: tuple[str, str, str], make_bundle: MakeBundle) -> None:
    url_a, url_b, admin = two_fleets
    async with aiohttp.ClientSession() as http:
        for name in ("a", "b", "c"):
            d = make_bundle("mlp", name=name, version="1.0.0")
            archive = bundle.pack(d, d.parent / f"{name}.tar.gz").read_bytes()
            assert (await _call(http, "POST", f"{url_a}/api/v1/bundles", admin, data=archive))[0] == 201
        _, tok = await _call(http, "POST", f"{url_a}/api/v1/enroll-tokens", admin, json_body={"uses": 1})
        async with http.post(f"{url_b}/api/v1/enroll", json={"name": "d"},
                             headers={"Authorization": f"Bearer {tok['token']}"}) as r:
            enrolled = await r.json()
        device, cred = enrolled["device_id"], enrolled["credential"]

        sets = [["a@1.0.0"], ["b@1.0.0"], ["c@1.0.0"], ["a@1.0.0", "b@1.0.0"], ["b@1.0.0", "c@1.0.0"], []]
        puts = [(url_a if i % 2 else url_b, sets[i % len(sets)]) for i in range(24)]
        results = await asyncio.gather(*(
            _call(http, "PUT", f"{u}/api/v1/devices/{device}/assignment", admin, json_body={"bundles": s})
            for u, s in puts))
        assert all(status == 200 for status, _ in results), results
        by_serial: dict[int, set[str]] = {}
        for (_, body), (_, wanted) in zip(results, puts, strict=True):
            state = json.dumps(sorted(wanted))
            by_serial.setdefault(body["serial"], set()).add(state)
        # one serial, one state: no two different sets ever shared a serial
        assert all(len(states) == 1 for states in by_serial.values()), by_serial
        top = max(by_serial)
        (final,) = by_serial[top]
        for u in (url_a, url_b):
            _, signed = await _call(http, "GET", f"{u}/api/v1/devices/{device}/assignment", cred)
            doc = signed["document"]
            assert doc["serial"] == top
            assert json.dumps(sorted(b["ref"] for b in doc["bundles"])) == final

        # a long-poll held by B is answered when A changes the assignment
        poll = asyncio.create_task(_call(
            http, "GET", f"{url_b}/api/v1/devices/{device}/assignment?serial={top}&wait_s=30", cred))
        await asyncio.sleep(0.5)
        assert not poll.done()
        nxt = ["c@1.0.0"] if final != json.dumps(["c@1.0.0"]) else ["a@1.0.0"]
        status, changed = await _call(http, "PUT", f"{url_a}/api/v1/devices/{device}/assignment", admin,
                                      json_body={"bundles": nxt})
        status, answered = await asyncio.wait_for(poll, 15)
        assert status == 200 and answered["document"]["serial"] == changed["serial"] == top + 1
