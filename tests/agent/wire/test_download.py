"""Bundle downloads from a real fleet: resume after interruption, content addressing, caps, stalls, backoff.

Byte counts come from a loopback proxy between the agent and the fleet: what
the fleet actually put on the wire for each connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping

import pytest

from agent.credentials import Credential
from agent.download import BlobStore, DownloadPolicy, fetch_blob
from agent.fleet_client import AiohttpTransport, FleetClient, HttpRequest, HttpResponse
from agent.fleet_errors import (
    DownloadError,
    DownloadHashMismatch,
    DownloadStalled,
    DownloadTooLarge,
    FleetRejected,
    FleetUnreachable,
)
from fleet.api import FLEET
from runtime import Backoff
from tests.conftest import MakeBundle

from .conftest import LiveFleet
from .proxy import Proxy

Device = tuple[FleetClient, Credential]
FAST = DownloadPolicy(attempts=3, backoff_base_s=0.01, backoff_max_s=0.05)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def _published(live_fleet: LiveFleet, device: Device, make_bundle: MakeBundle, tmp_path: pathlib.Path,
                     payload_bytes: int, version: str = "1.0.0") -> tuple[str, str, int]:
    """A signed bundle carrying `payload_bytes` of incompressible data, pushed and assigned: (url, sha, size)."""
    asset = tmp_path / f"weights-{version}.bin"
    asset.write_bytes(random.Random(payload_bytes).randbytes(payload_bytes))
    view = await live_fleet.push(make_bundle("mlp", name="big", version=version, assets=(asset,)), compress=False)
    await live_fleet.assign(device[1].device_id, [view["ref"]])
    return f"/api/v1/bundles/big/{version}/archive", view["archive_sha256"], view["size"]


async def _proxy(live_fleet: LiveFleet) -> Proxy:
    host, port = live_fleet.url.removeprefix("http://").rsplit(":", 1)
    return await Proxy(host, int(port)).start()


def _via(proxy: Proxy, cred: Credential) -> FleetClient:
    return FleetClient(proxy.url, cred.device_id, cred.secret)


@pytest.mark.slow
async def test_interrupted_50mb_download_resumes_with_only_the_rest(
        live_fleet: LiveFleet, device: Device, make_bundle: MakeBundle, tmp_path: pathlib.Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The link drops at 50%; the agent gives up (as if killed); a new run fetches only the missing half."""
    url, sha, size = await _published(live_fleet, device, make_bundle, tmp_path, 50 << 20)
    proxy = await _proxy(live_fleet)
    proxy.cuts[0] = size // 2
    store = BlobStore(tmp_path / "agent")
    try:
        async with _via(proxy, device[1]) as client:
            with pytest.raises(DownloadError):
                await client.download(url, store, sha, size, DownloadPolicy(attempts=1))
        kept = store.staging_path(sha).stat().st_size
        assert size // 2 - (1 << 20) < kept <= size // 2 and not store.path(sha).exists()

        async with _via(proxy, device[1]) as client:  # a fresh client: nothing carried over but the file
            path = await client.download(url, store, sha, size, DownloadPolicy(attempts=1))
    finally:
        await proxy.stop()
    assert path == store.path(sha) and _sha256(path) == sha and not store.staging_path(sha).exists()
    assert path.stat().st_mode & 0o777 == 0o444
    first, second = proxy.downstream
    assert size - kept <= second < size - kept + 4096  # the rest, plus one response's headers
    assert first + second < size + 8192  # the whole file crossed the wire once
    with capsys.disabled():
        print(f"\n[resume] archive {size} B; first connection {first} B (cut), kept {kept} B; "
              f"resumed connection {second} B ({second / size:.1%} of the archive); total {first + second} B")


async def test_a_dropped_link_is_retried_within_one_call_from_where_it_stopped(
        live_fleet: LiveFleet, device: Device, make_bundle: MakeBundle, tmp_path: pathlib.Path) -> None:
    url, sha, size = await _published(live_fleet, device, make_bundle, tmp_path, 3 << 20)
    proxy = await _proxy(live_fleet)
    proxy.cuts[0] = size // 3
    try:
        async with _via(proxy, device[1]) as client:
            path = await client.download(url, BlobStore(tmp_path / "agent"), sha, size, FAST)
    finally:
        await proxy.stop()
    assert _sha256(path) == sha
    assert len(proxy.downstream) == 2 and proxy.downstream[1] < size - size // 3 + 4096 + (1 << 18)


class Counting:
    """The real transport, counting requests and body bytes received."""

    def __init__(self, base_url: str) -> None:
        self.inner = AiohttpTransport(base_url)
        self.requests: list[HttpRequest] = []
        self.received = 0

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        resp = await self.inner(request)
        body = resp.body

        async def counted() -> AsyncIterator[bytes]:
            async for chunk in body:
                self.received += len(chunk)
                yield chunk

        resp.body = counted()
        return resp

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_blob_already_present_is_never_fetched_again(
        live_fleet: LiveFleet, device: Device, make_bundle: MakeBundle, tmp_path: pathlib.Path) -> None:
    url, sha, size = await _published(live_fleet, device, make_bundle, tmp_path, 256 << 10)
    counting = Counting(live_fleet.url)
    client = FleetClient(live_fleet.url, device[1].device_id, device[1].secret, counting)
    store = BlobStore(tmp_path / "agent")
    try:
        first, twin = await asyncio.gather(client.download(url, store, sha, size),
                                           client.download(url, BlobStore(store.root), sha, size))
        assert first == twin and len(counting.requests) == 1 and counting.received == size  # one fetch for both
        assert await client.download(url, store, sha, size) == first
        assert await client.download("/api/v1/bundles/other/9/archive", store, sha, size) == first
        assert len(counting.requests) == 1  # no request at all, whatever the URL
        # a blob damaged on disk is not "present": it is removed and fetched again
        first.chmod(0o644)
        with open(first, "r+b") as f:
            f.write(b"\0")
        again = await client.download(url, store, sha, size)
        assert _sha256(again) == sha and len(counting.requests) == 2
    finally:
        await counting.aclose()


async def test_bytes_that_do_not_hash_right_are_refused_and_removed(
        live_fleet: LiveFleet, device: Device, make_bundle: MakeBundle, tmp_path: pathlib.Path) -> None:
    url, sha, size = await _published(live_fleet, device, make_bundle, tmp_path, 256 << 10)
    served = live_fleet.running.runner.app[FLEET].blobs.path(sha)  # type: ignore[union-attr]
    served.chmod(0o644)
    with open(served, "r+b") as f:  # one bit flipped on the fleet's disk, same length (THREATS 1)
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 1]))
    store = BlobStore(tmp_path / "agent")
    client = device[0]
    with pytest.raises(DownloadHashMismatch) as caught:
        await client.download(url, store, sha, size, FAST)
    assert caught.value.expected == sha and caught.value.actual != sha
    assert not store.path(sha).exists() and not store.staging_path(sha).exists()


async def test_more_bytes_than_declared_are_refused(
        live_fleet: LiveFleet, device: Device, make_bundle: MakeBundle, tmp_path: pathlib.Path) -> None:
    """The fleet's archive is longer than the document says (THREATS 2): refused before reading it."""
    url, sha, size = await _published(live_fleet, device, make_bundle, tmp_path, 256 << 10)
    counting = Counting(live_fleet.url)
    store = BlobStore(tmp_path / "agent")
    try:
        client = FleetClient(live_fleet.url, device[1].device_id, device[1].secret, counting)
        with pytest.raises(DownloadTooLarge):
            await client.download(url, store, sha, size - 100, FAST)
    finally:
        await counting.aclose()
    assert len(counting.requests) == 1 and counting.received < 1 << 16  # not retried, not read
    assert not store.staging_path(sha).exists()


class Streaming:
    """An in-memory fleet whose archive body is produced by `body` (no Content-Length): endless, trickling..."""

    def __init__(self, body: Callable[[], AsyncIterator[bytes]] | None = None, status: int = 200,
                 headers: dict[str, str] | None = None) -> None:
        self.make = body
        self.status = status
        self.headers = headers or {}
        self.requests: list[HttpRequest] = []
        self.yielded = 0

    async def get(self, path: str, headers: Mapping[str, str] | None = None,
                  timeout_s: float | None = None) -> HttpResponse:
        self.requests.append(HttpRequest("GET", path, dict(headers or {})))
        if self.status >= 400:
            raise FleetRejected(self.status, "scripted")
        assert self.make is not None
        return HttpResponse(self.status, self.headers, self._count(self.make()))

    async def _count(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in body:
            self.yielded += len(chunk)
            yield chunk


async def _endless() -> AsyncIterator[bytes]:
    while True:
        yield b"x" * 65536
        await asyncio.sleep(0)


async def test_an_endless_body_is_cut_at_the_declared_size(tmp_path: pathlib.Path) -> None:
    fleet = Streaming(_endless)
    store = BlobStore(tmp_path)
    with pytest.raises(DownloadTooLarge):
        await fetch_blob(fleet, "/a", store, "0" * 64, 1_000_000, FAST)
    assert fleet.yielded <= 1_000_000 + 65536 and len(fleet.requests) == 1
    assert not store.staging_path("0" * 64).exists()


async def _one_chunk_then_silence() -> AsyncIterator[bytes]:
    yield b"y" * 1000
    await asyncio.sleep(3600)


async def _trickle() -> AsyncIterator[bytes]:
    while True:
        yield b"z" * 50
        await asyncio.sleep(0.02)


async def test_silence_is_a_stall_and_the_retry_resumes(tmp_path: pathlib.Path) -> None:
    fleet = Streaming(_one_chunk_then_silence)
    policy = DownloadPolicy(attempts=2, backoff_base_s=0.01, chunk_timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        await fetch_blob(fleet, "/a", BlobStore(tmp_path), "1" * 64, 10_000, policy)
    assert isinstance(caught.value.__cause__, DownloadStalled)
    assert time.monotonic() - started < 3
    assert "Range" not in fleet.requests[0].headers
    assert fleet.requests[1].headers["Range"] == "bytes=1000-" and fleet.requests[1].headers["If-Range"] == \
        f'"{"1" * 64}"'


async def test_a_trickle_below_the_minimum_throughput_is_a_stall(tmp_path: pathlib.Path) -> None:
    fleet = Streaming(_trickle)
    policy = DownloadPolicy(attempts=1, chunk_timeout_s=5, min_rate_bytes_per_s=10_000, rate_window_s=0.3)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="gave up") as caught:
        await fetch_blob(fleet, "/a", BlobStore(tmp_path), "2" * 64, 10_000_000, policy)
    assert isinstance(caught.value.__cause__, DownloadStalled) and "B/s" in str(caught.value.__cause__)
    assert time.monotonic() - started < 3


async def test_refusals_are_not_retried_and_failures_back_off_with_full_jitter(tmp_path: pathlib.Path) -> None:
    gone = Streaming(status=404)
    with pytest.raises(FleetRejected):
        await fetch_blob(gone, "/a", BlobStore(tmp_path), "3" * 64, 10, FAST)
    assert len(gone.requests) == 1

    class Down:
        calls = 0

        async def get(self, path: str, headers: Mapping[str, str] | None = None,
                      timeout_s: float | None = None) -> HttpResponse:
            self.calls += 1
            raise FleetUnreachable("connection refused")

    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    down = Down()
    policy = DownloadPolicy(attempts=8, backoff_base_s=1.0, backoff_max_s=20.0)
    with pytest.raises(DownloadError, match="gave up after 8 tries"):
        await fetch_blob(down, "/a", BlobStore(tmp_path), "4" * 64, 10, policy, rng=random.Random(7), sleep=sleep)
    assert down.calls == 8 and len(slept) == 7
    assert all(0 <= s <= min(20.0, 2.0**k) for k, s in enumerate(slept)), slept
    assert len(set(slept)) == 7  # jittered, not a fixed ladder


def test_full_jitter_spreads_over_the_whole_window() -> None:
    rng = random.Random(3)
    backoff = Backoff(0.5, 60.0)  # the downloads' backoff (DownloadPolicy.backoff_base_s / backoff_max_s)
    samples = [backoff.delay_s(4, rng.random) for _ in range(4000)]
    assert 0 <= min(samples) < 0.2 and 7.8 < max(samples) <= 8.0
    assert 3.7 < sum(samples) / len(samples) < 4.3
    assert max(backoff.delay_s(200, rng.random) for _ in range(100)) <= 60.0


async def test_leftover_bytes_that_do_not_verify_are_fetched_whole(
        live_fleet: LiveFleet, device: Device, make_bundle: MakeBundle, tmp_path: pathlib.Path) -> None:
    """A staging file from an earlier run is a guess: garbage there costs one full download, never a refusal."""
    url, sha, size = await _published(live_fleet, device, make_bundle, tmp_path, 256 << 10)
    store = BlobStore(tmp_path / "agent")
    store.ensure()
    store.staging_path(sha).write_bytes(os.urandom(1000))
    path = await device[0].download(url, store, sha, size, FAST)
    assert _sha256(path) == sha
    store.remove(sha)
    store.staging_path(sha).write_bytes(os.urandom(size))  # complete length, wrong bytes
    assert _sha256(await device[0].download(url, store, sha, size, FAST)) == sha
