"""The model store over HTTP: push, immutability, refusal of bad bundles, download, revoke."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import time
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select

from fleet.db import Bundle
from tests.conftest import MakeBundle

from .conftest import MAX_BUNDLE_BYTES, Harness


def _blob_files(api: Harness) -> list[pathlib.Path]:
    return [p for p in (api.fleet.config.blob_dir / "sha256").rglob("*") if p.is_file()]


def _leftovers(api: Harness) -> list[pathlib.Path]:
    return list((api.fleet.config.blob_dir / "tmp").iterdir())


async def _bundle_rows(api: Harness) -> int:
    async with api.fleet.db.transaction() as s:
        return int((await s.execute(select(func.count()).select_from(Bundle))).scalar_one())


async def test_push_list_show(api: Harness, make_bundle: MakeBundle) -> None:
    r = await api.push(make_bundle("mlp", name="demo", version="1.0.0"))
    assert r.status == 201, r.body
    assert r.body["created"] is True and r.body["ref"] == "demo@1.0.0" and r.body["release"] == 1
    listed = await api.call("GET", "/api/v1/bundles", api.admin)
    assert [b["ref"] for b in listed.body["bundles"]] == ["demo@1.0.0"]
    shown = await api.call("GET", "/api/v1/bundles/demo/1.0.0", api.admin)
    assert shown.status == 200 and shown.body["manifest"]["name"] == "demo"
    assert (await api.call("GET", "/api/v1/bundles/demo/9.9.9", api.admin)).status == 404
    assert len(_blob_files(api)) == 1 and not _leftovers(api)


async def test_identical_repush_is_a_noop_even_when_repacked(api: Harness, make_bundle: MakeBundle) -> None:
    d = make_bundle("mlp", name="demo", version="1.0.0")
    first = await api.push(d)
    again = await api.push(d)  # packed again: other archive bytes, same signed content
    assert first.status == 201 and again.status == 200
    assert again.body["created"] is False and again.body["digest"] == first.body["digest"]
    assert await _bundle_rows(api) == 1


async def test_different_content_under_existing_version_is_refused(api: Harness, make_bundle: MakeBundle) -> None:
    assert (await api.push(make_bundle("mlp", name="demo", version="1.0.0"))).status == 201
    r = await api.push(make_bundle("cnn", name="demo", version="1.0.0"))
    assert r.status == 409 and "immutable" in r.body["error"]
    assert await _bundle_rows(api) == 1 and len(_blob_files(api)) == 1


async def test_tampered_bundle_is_refused_with_reason_and_nothing_stored(api: Harness,
                                                                         make_bundle: MakeBundle) -> None:
    d = make_bundle("mlp", name="demo", version="1.0.0")
    model = next(d.glob("*.onnx")) if list(d.glob("*.onnx")) else next(p for p in d.rglob("*.onnx"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    r = await api.push(d)
    assert r.status == 422
    assert "rejected" in r.body["error"] and "signed digest" in r.body["error"]
    assert str(api.fleet.config.data_dir) not in r.body["error"]  # server paths never leak
    assert await _bundle_rows(api) == 0 and _blob_files(api) == [] and _leftovers(api) == []


async def test_untrusted_and_unsigned_bundles_are_refused(api: Harness, make_bundle: MakeBundle,
                                                          other_keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    r = await api.push(make_bundle("mlp", name="demo", version="1.0.0", key=other_keypair[0]))
    assert r.status == 422 and "rejected" in r.body["error"]
    r = await api.push(make_bundle("mlp", name="demo", version="1.0.1", sign=False))
    assert r.status == 422
    r = await api.call("POST", "/api/v1/bundles", api.admin, data=b"not a tar archive at all")
    assert r.status == 422
    r = await api.call("POST", "/api/v1/bundles", api.admin, data=b"")
    assert r.status == 400
    assert await _bundle_rows(api) == 0 and _blob_files(api) == [] and _leftovers(api) == []


async def test_oversized_push_is_413_and_leaves_nothing(api: Harness) -> None:
    r = await api.call("POST", "/api/v1/bundles", api.admin, data=b"\0" * (MAX_BUNDLE_BYTES + 1))
    assert r.status == 413 and "larger than" in r.body["error"]

    async def trickle() -> object:  # no Content-Length: the cap applies while streaming
        for _ in range(MAX_BUNDLE_BYTES // (1 << 16) + 2):
            yield b"\0" * (1 << 16)

    try:
        r = await api.call("POST", "/api/v1/bundles", api.admin, data=trickle())
        assert r.status == 413
    except aiohttp.ClientError:
        pass  # the server may close the socket while the client is still sending: also a refusal
    assert await _bundle_rows(api) == 0 and _blob_files(api) == [] and _leftovers(api) == []


async def test_download_etag_range_and_not_modified(api: Harness, make_bundle: MakeBundle) -> None:
    d = make_bundle("mlp", name="demo", version="1.0.0")
    archive = api.pack(d)
    await api.call("POST", "/api/v1/bundles", api.admin, data=archive.read_bytes())
    full = archive.read_bytes()
    path = "/api/v1/bundles/demo/1.0.0/archive"
    r = await api.call("GET", path, api.admin)
    assert r.status == 200 and r.raw == full
    assert r.headers["ETag"] == f'"{hashlib.sha256(full).hexdigest()}"'
    assert r.headers["Accept-Ranges"] == "bytes"
    etag = r.headers["ETag"]
    assert (await api.call("GET", path, api.admin, headers={"If-None-Match": etag})).status == 304
    assert (await api.call("GET", path, api.admin, headers={"If-None-Match": '"other"'})).status == 200
    # resume: the first part, then the rest from where it stopped
    head = await api.call("GET", path, api.admin, headers={"Range": "bytes=0-99"})
    assert head.status == 206 and head.headers["Content-Range"] == f"bytes 0-99/{len(full)}"
    tail = await api.call("GET", path, api.admin, headers={"Range": "bytes=100-", "If-Range": etag})
    assert tail.status == 206 and head.raw + tail.raw == full
    suffix = await api.call("GET", path, api.admin, headers={"Range": "bytes=-10"})
    assert suffix.raw == full[-10:]
    stale = await api.call("GET", path, api.admin, headers={"Range": "bytes=100-", "If-Range": '"old"'})
    assert stale.status == 200 and stale.raw == full
    past = await api.call("GET", path, api.admin, headers={"Range": f"bytes={len(full)}-"})
    assert past.status == 416 and past.headers["Content-Range"] == f"bytes */{len(full)}"


async def test_revoke_refuses_assignment_and_tells_devices(api: Harness, make_bundle: MakeBundle) -> None:
    await api.push(make_bundle("mlp", name="demo", version="1.0.0"))
    device, cred = await api.enroll("d1")
    r = await api.call("PUT", f"/api/v1/devices/{device}/assignment", api.admin, json={"bundles": ["demo@1.0.0"]})
    assert r.body["serial"] == 1
    assert (await api.call("GET", "/api/v1/bundles/demo/1.0.0/archive", cred)).status == 200
    r = await api.call("POST", "/api/v1/bundles/demo/1.0.0/revoke", api.admin, json={"reason": "NaN storm"})
    assert r.status == 200 and r.body["revoked"] is True and r.body["devices_told"] == 1
    doc = (await api.call("GET", f"/api/v1/devices/{device}/assignment", cred)).body["document"]
    assert doc["serial"] == 2 and doc["revoked"] == ["demo@1.0.0"] and doc["bundles"][0]["revoked"] is True
    assert (await api.call("GET", "/api/v1/bundles/demo/1.0.0/archive", cred)).status == 410
    r = await api.call("PUT", f"/api/v1/devices/{device}/assignment", api.admin, json={"bundles": ["demo@1.0.0"]})
    assert r.status == 409
    assert (await api.call("POST", "/api/v1/bundles/demo/9/revoke", api.admin, json={})).status == 404


async def test_revoke_tells_devices_that_report_running_it(api: Harness, make_bundle: MakeBundle) -> None:
    await api.push(make_bundle("mlp", name="demo", version="1.0.0"))
    device, cred = await api.enroll("d1")
    report = {"bundles": [{"ref": "demo@1.0.0", "active": True, "engine": "cpu"}]}
    assert (await api.call("POST", f"/api/v1/devices/{device}/reports", cred, json=report)).status == 202
    r = await api.call("POST", "/api/v1/bundles/demo/1.0.0/revoke", api.admin, json={})
    assert r.body["devices_told"] == 1
    doc = (await api.call("GET", f"/api/v1/devices/{device}/assignment", cred)).body["document"]
    assert doc["serial"] == 1 and doc["bundles"] == [] and doc["revoked"] == ["demo@1.0.0"]


async def test_a_push_that_loses_a_race_leaves_no_blob(api: Harness, make_bundle: MakeBundle,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two different contents for one version, verified side by side: both pass the "exists?" check,
    both commit their blob, one row wins; the loser's blob must go."""
    store = api.fleet.bundles
    verify = store._verify
    both_verified = asyncio.Barrier(2)

    async def verify_then_meet(archive: pathlib.Path) -> Any:
        verified = await verify(archive)
        await both_verified.wait()  # neither looks for an existing row before both are verified
        return verified

    monkeypatch.setattr(store, "_verify", verify_then_meet)
    x = api.pack(make_bundle("mlp", name="race", version="1.0.0")).read_bytes()
    y = api.pack(make_bundle("cnn", name="race", version="1.0.0")).read_bytes()
    first, second = await asyncio.gather(api.call("POST", "/api/v1/bundles", api.admin, data=x),
                                         api.call("POST", "/api/v1/bundles", api.admin, data=y))
    assert sorted([first.status, second.status]) == [201, 409], (first.body, second.body)
    winner = first if first.status == 201 else second
    assert [p.name for p in _blob_files(api)] == [winner.body["archive_sha256"]]
    assert await _bundle_rows(api) == 1 and _leftovers(api) == []


async def test_maintenance_collects_old_unreferenced_blobs_only(api: Harness, make_bundle: MakeBundle) -> None:
    kept = await api.push(make_bundle("mlp", name="demo", version="1.0.0"))
    blobs = api.fleet.blobs
    strays = []
    for content in (b"left by a process that died before its row", b"a push in progress"):
        upload = blobs.begin_upload()
        upload.write(content)
        digest = upload.finish()
        blobs.commit(upload, digest)
        strays.append(digest)
    old = time.time() - 2 * 3600
    for path in [blobs.path(strays[0]), blobs.path(kept.body["archive_sha256"])]:
        os.utime(path, (old, old))
    await api.fleet.maintain_once()
    assert sorted(p.name for p in _blob_files(api)) == sorted([kept.body["archive_sha256"], strays[1]])
    r = await api.call("GET", "/api/v1/bundles/demo/1.0.0/archive", api.admin)
    assert r.status == 200 and hashlib.sha256(r.raw).hexdigest() == kept.body["archive_sha256"]
