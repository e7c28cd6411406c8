"""Bodies over the byte budget wait for room, first come first served, against a real server (agent.admission).

The real HTTP edge with real models: the MLP for small JSON bodies, the CNN for ~0.6 MB
binary images. A "trickling" client (raw socket) declares a Content-Length and sends only
part of it: its handler holds that many budget bytes until the rest comes, which is how
these tests fill the budget for exactly as long as they need.
"""

from __future__ import annotations

import asyncio
import io
import pathlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import numpy as np
import orjson

import bundle
from agent import DataPlane, ModelConfig, ServerConfig
from agent.admission import ByteBudget
from agent.http_server import BUDGET, HttpServer
from tests.agent.conftest import Served, tensor
from tests.agent.test_http_bad_input import _assert_exact

IMG = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
ROW = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)


class PeakBudget(ByteBudget):
    """The real budget, recording the most bytes it ever held at once."""

    def __init__(self, limit_bytes: int) -> None:
        self.peak = 0
        super().__init__(limit_bytes)

    @property  # type: ignore[override]
    def in_flight(self) -> int:
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._in_flight = value
        self.peak = max(self.peak, value)


@asynccontextmanager
async def _serving(dirs: list[pathlib.Path], trust: list[bundle.TrustAnchor],
                   config: ServerConfig) -> AsyncIterator[Served]:
    dp = DataPlane()
    for d in dirs:
        dp.load_bundle(bundle.verify(d, trust), ModelConfig())
    server = HttpServer(dp, config)
    server.app[BUDGET] = PeakBudget(config.body_budget_bytes)  # before start: the app is frozen then
    await server.start()
    served = Served(server, dp, server.url, aiohttp.ClientSession())
    try:
        yield served
    finally:
        await served.session.close()
        await server.stop()


def _budget(served: Served) -> PeakBudget:
    budget = served.server.app[BUDGET]
    assert isinstance(budget, PeakBudget)
    return budget


def _cnn_body(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(images.shape),
                                       "parameters": {"binary_data_size": images.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    return header + images.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"}


def _mlp_body(size: int) -> bytes:
    """A valid MLP request padded with trailing spaces to `size` bytes."""
    body = orjson.dumps({"inputs": [tensor("input", ROW)]})
    return body + b" " * (size - len(body))


async def _post(served: Served, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any, float]:
    """Status, the answer (logits, or (error, Retry-After) when not 200) and when it completed."""
    async with served.session.post(served.url + path, data=io.BytesIO(body), headers=headers) as r:  # Content-Length
        if r.status != 200:
            doc = await r.json()
            return r.status, (doc["error"], r.headers.get("Retry-After")), time.monotonic()
        if r.content_type == "application/json":
            doc = await r.json()
            out = doc["outputs"][0]
            return 200, np.array(out["data"], np.float32).reshape(out["shape"]), time.monotonic()
        n = int(r.headers["Inference-Header-Content-Length"])
        raw = await r.read()
        return 200, np.frombuffer(raw[n:], np.float32).reshape(-1, 1000), time.monotonic()


async def _post_cnn(served: Served, images: np.ndarray, headers: dict[str, str] | None = None
                    ) -> tuple[int, Any, float]:
    body, h = _cnn_body(images)
    return await _post(served, "/v2/models/cnn/infer", body, {**h, **(headers or {})})


async def _post_mlp(served: Served, size: int, headers: dict[str, str] | None = None) -> tuple[int, Any, float]:
    return await _post(served, "/v2/models/mlp/infer", _mlp_body(size),
                       {"Content-Type": "application/json", **(headers or {})})


async def _until(condition: Any, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out waiting for the server"
        await asyncio.sleep(0.001)


class _Trickle:
    """A client that declared `size` bytes of MLP body and has sent only `sent` of them."""

    def __init__(self, served: Served, size: int, sent: int) -> None:
        self.served, self.body, self.sent = served, _mlp_body(size), sent

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.served.server.port)
        self.writer.write(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body[:self.sent])
        await self.writer.drain()
        budget = _budget(self.served)
        await _until(lambda: budget.in_flight >= len(self.body))

    async def finish(self) -> bytes:
        self.writer.write(self.body[self.sent:])
        await self.writer.drain()
        status_line = await asyncio.wait_for(self.reader.readline(), 10)
        self.writer.close()
        return status_line


async def test_concurrent_bodies_over_the_budget_wait_and_are_all_served_within_it(
        bundles: dict[str, pathlib.Path], trust: list[bundle.TrustAnchor], reference: Any) -> None:
    one = IMG[:1]
    body_len = len(_cnn_body(one)[0])
    config = ServerConfig(port=0, max_body_bytes=700_000, max_inflight_body_bytes=1_400_000,
                          body_budget_wait_s=30.0)
    assert 2 * body_len <= config.body_budget_bytes < 3 * body_len  # room for two bodies at once
    async with _serving([bundles["cnn"]], trust, config) as served:
        budget = _budget(served)
        results = await asyncio.gather(*(_post_cnn(served, one) for _ in range(8)))
        want = reference("cnn", {"image": one})["logits"]
        for status, out, _ in results:
            assert status == 200, out
            np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
        print(f"peak {budget.peak} of {budget.limit_bytes} bytes; {budget.waited} of 8 waited")
        assert budget.peak <= budget.limit_bytes
        assert budget.peak >= 2 * body_len and budget.waited >= 1  # it was full, and some did wait
        assert budget.in_flight == 0 and budget.waiting == 0 and budget.refused == 0
        async with served.session.get(served.url + "/metrics") as r:  # what an operator sees of it
            text = await r.text()
        values = {k: float(v) for k, _, v in (line.partition(" ") for line in text.splitlines())
                  if k.startswith("outpost_http_body")}
        assert values["outpost_http_body_budget_waited_total"] == budget.waited
        assert values["outpost_http_body_bytes_in_flight"] == values["outpost_http_body_budget_waiting"] == 0
        assert values["outpost_http_body_budget_bytes"] == budget.limit_bytes


async def test_a_short_wait_or_a_near_deadline_ends_in_a_503_naming_the_budget(
        bundles: dict[str, pathlib.Path], trust: list[bundle.TrustAnchor], reference: Any) -> None:
    config = ServerConfig(port=0, max_body_bytes=256 << 10, max_inflight_body_bytes=256 << 10,
                          body_budget_wait_s=0.05)
    async with _serving([bundles["mlp"]], trust, config) as served:
        budget = _budget(served)
        held = _Trickle(served, 200_000, 100_000)
        await held.start()
        status, (error, retry_after), _ = await _post_mlp(served, 100_000)
        assert status == 503 and int(retry_after) >= 1
        assert "262144-byte memory budget" in error and "after waiting 0.05 s" in error, error
        assert budget.refused_after_wait == 1 and budget.waiting == 0
        assert await held.finish() == b"HTTP/1.1 200 OK\r\n"
        await _assert_exact(served, reference)
        assert budget.in_flight == 0

    config = ServerConfig(port=0, max_body_bytes=256 << 10, max_inflight_body_bytes=256 << 10,
                          body_budget_wait_s=30.0)
    async with _serving([bundles["mlp"]], trust, config) as served:
        held = _Trickle(served, 200_000, 100_000)
        await held.start()
        started = time.monotonic()
        status, (error, _), _ = await _post_mlp(served, 100_000, {"Outpost-Timeout-Ms": "200"})
        assert status == 503 and "memory budget" in error and "after waiting" in error, error
        assert time.monotonic() - started < 5  # its deadline, not the 30 s wait
        assert await held.finish() == b"HTTP/1.1 200 OK\r\n"
        assert _budget(served).in_flight == 0


async def test_a_big_body_waiting_first_is_served_before_smaller_ones_that_came_after(
        bundles: dict[str, pathlib.Path], trust: list[bundle.TrustAnchor], reference: Any) -> None:
    big_len = len(_cnn_body(IMG)[0])  # ~1.2 MB
    config = ServerConfig(port=0, max_body_bytes=1_400_000, max_inflight_body_bytes=1_400_000,
                          body_budget_wait_s=30.0)
    small = 250_000
    async with _serving([bundles["cnn"], bundles["mlp"]], trust, config) as served:
        budget = _budget(served)
        held = _Trickle(served, 600_000, 100_000)
        await held.start()
        assert budget.limit_bytes - 600_000 < big_len  # the big one does not fit beside it ...
        assert budget.limit_bytes - 600_000 >= 3 * small  # ... but every small one would
        assert budget.limit_bytes - big_len < small  # and none fits beside the big one
        big = asyncio.ensure_future(_post_cnn(served, IMG))
        await _until(lambda: budget.waiting == 1)
        smalls = [asyncio.ensure_future(_post_mlp(served, small)) for _ in range(3)]
        await _until(lambda: budget.waiting == 4)
        await asyncio.sleep(0.1)
        assert budget.waiting == 4 and budget.in_flight == 600_000  # room for them, yet they queue behind it

        seen: set[tuple[int, int]] = set()

        async def sample() -> None:
            while True:
                seen.add((budget.in_flight, budget.waiting))
                await asyncio.sleep(0.0005)

        sampler = asyncio.ensure_future(sample())
        assert await held.finish() == b"HTTP/1.1 200 OK\r\n"
        big_status, big_out, big_done = await big
        small_results = await asyncio.gather(*smalls)
        sampler.cancel()
        assert big_status == 200, big_out
        np.testing.assert_allclose(big_out, reference("cnn", {"image": IMG})["logits"], rtol=1e-4, atol=1e-4)
        want = reference("mlp", {"input": ROW})["logits"]
        for status, out, done in small_results:
            assert status == 200, out
            np.testing.assert_array_equal(out, want)
            assert done > big_done
        assert (big_len, 3) in seen, sorted(seen)  # the big one held the budget while all three still waited
        assert budget.peak <= budget.limit_bytes and budget.in_flight == 0 and budget.refused == 0


async def test_a_client_that_disconnects_while_waiting_leaves_the_queue(
        bundles: dict[str, pathlib.Path], trust: list[bundle.TrustAnchor], reference: Any) -> None:
    config = ServerConfig(port=0, max_body_bytes=256 << 10, max_inflight_body_bytes=256 << 10,
                          body_budget_wait_s=30.0)
    async with _serving([bundles["mlp"]], trust, config) as served:
        budget = _budget(served)
        held = _Trickle(served, 200_000, 100_000)
        await held.start()
        body = _mlp_body(100_000)  # under aiohttp's read buffer: the server sees the connection close
        _, writer = await asyncio.open_connection("127.0.0.1", served.server.port)
        writer.write(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await _until(lambda: budget.waiting == 1)
        writer.close()  # the client goes away while waiting
        started = time.monotonic()
        await _until(lambda: budget.waiting == 0, timeout_s=5)
        assert time.monotonic() - started < 5  # cancelled with its handler, not timed out after 30 s
        assert budget.refused == 0 and budget.in_flight == 200_000
        assert await held.finish() == b"HTTP/1.1 200 OK\r\n"
        await _assert_exact(served, reference)
        assert budget.in_flight == 0 and budget.waiting == 0


async def test_a_chunked_body_that_outgrows_the_room_is_refused_at_once(
        bundles: dict[str, pathlib.Path], trust: list[bundle.TrustAnchor], reference: Any) -> None:
    config = ServerConfig(port=0, max_body_bytes=256 << 10, max_inflight_body_bytes=256 << 10,
                          body_budget_wait_s=30.0)
    async with _serving([bundles["mlp"]], trust, config) as served:
        budget = _budget(served)
        held = _Trickle(served, 200_000, 100_000)
        await held.start()
        part = b" " * 40_000
        reader, writer = await asyncio.open_connection("127.0.0.1", served.server.port)
        writer.write(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n%x\r\n%s\r\n" % (len(part), part))
        await writer.drain()
        await _until(lambda: budget.in_flight == 240_000)  # its first 40 KB fitted, and are held
        started = time.monotonic()
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(part), part))  # 80 KB: past the 62 KB of room
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, doc = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head, head
        error = orjson.loads(doc)["error"]
        assert "memory budget" in error and "after waiting" not in error, error
        assert time.monotonic() - started < 5 and budget.waited == 0  # refused at once, not after the 30 s
        assert budget.in_flight == 200_000  # its 40 KB came back; the trickler's are still held
        assert await held.finish() == b"HTTP/1.1 200 OK\r\n"
        await _assert_exact(served, reference)
        assert budget.in_flight == 0
