"""Big JSON bodies cost bounded memory and never stall the event loop (issue 9 section 3).

The real `outpost serve` process with the 224x224 CNN; eight clients (in a child process,
so their work does not share this process's GIL with the probes) each post a 60 MB JSON
body at once. Meanwhile this process samples the server's RSS with psutil and times
`/v2/health/live` on a kept-alive connection every 10 ms. Before the byte budget and
off-loop decoding, one such body cost +626 MiB RSS and stalled health for 1.8 s. The
budget holds two such bodies; the others wait for room, unread (so they cost no memory),
and are served, or answered 503 if none came within `body_budget_wait_s`.
"""

from __future__ import annotations

import http.client
import json
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import orjson
import psutil
import pytest

from tests.agent.test_serve_cli import ROOT, ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLIENTS = 8
IMAGES = 37  # x 150,528 numbers of ~10.6 characters: a ~60 MB body, under the 64 MiB default cap
RSS_LIMIT = 1 << 30
#: one 60 MB body decoded on the event loop stalled health for 1.8 s; both bounds catch that. The
#: worst single probe may also lose a scheduler slice or two to a neighbour on a shared 2-core
#: machine (108 ms seen with two busy loops beside the suite), so it is bounded looser than p99.
HEALTH_P99_LIMIT_S = 0.050
HEALTH_MAX_LIMIT_S = 0.300

_LOAD = """
import asyncio, json, os, sys, aiohttp
os.nice(10) # the clients' own CPU should not be what delays the server on a 2-core machine
async def one(s, url, body):
    async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        doc = await r.json(content_type=None)
        return r.status, r.headers.get("Retry-After"), doc.get("error") if isinstance(doc, dict) else None, \\
            (doc.get("outputs") or [{}])[0].get("shape") if isinstance(doc, dict) else None
async def main():
    url, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    body = open(path, "rb").read()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as s:
        print(json.dumps(await asyncio.gather(*(one(s, url, body) for _ in range(n)))))
asyncio.run(main())
"""


class _Probe(threading.Thread):
    """Health latency on one kept-alive connection and the server's RSS, until stopped."""

    def __init__(self, port: int, pid: int) -> None:
        super().__init__(daemon=True)
        self.port, self.proc = port, psutil.Process(pid)
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.rss: list[int] = []
        self.failures: list[str] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            self.rss.append(self.proc.memory_info().rss)
            t = time.perf_counter()
            try:
                conn.request("GET", "/v2/health/live")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    self.failures.append(f"status {resp.status}")
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.latencies.append(time.perf_counter() - t)
            time.sleep(0.01)
        conn.close()


def test_eight_concurrent_60mb_json_bodies_keep_rss_under_1gib_and_health_fast(
        bundles: dict[str, pathlib.Path], keypair: tuple[pathlib.Path, pathlib.Path],
        tmp_path: pathlib.Path) -> None:
    x = np.random.default_rng(0).random((IMAGES, 3, 224, 224), dtype=np.float32)
    body = orjson.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                                     "data": x.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY)
    assert 55e6 < len(body) < 64 << 20, len(body)
    path = tmp_path / "body.json"
    path.write_bytes(body)
    del body
    server = ServeProcess(str(bundles["cnn"]), "--trust", str(keypair[1]))
    try:
        server.wait_ready()
        probe = _Probe(server.port, server.proc.pid)
        probe.start()
        time.sleep(1.0)
        idle_rss, idle_worst = max(probe.rss), max(probe.latencies)
        load = subprocess.run([sys.executable, "-c", _LOAD, f"http://{server.url}/v2/models/cnn/infer",
                               str(path), str(CLIENTS)], cwd=ROOT, capture_output=True, text=True, timeout=280)
        time.sleep(0.3)
        probe.stop.set()
        probe.join(15)
    finally:
        server.stop()
    assert load.returncode == 0, load.stderr
    results = json.loads(load.stdout)
    statuses = [r[0] for r in results]
    peak_rss, worst, p99 = max(probe.rss), max(probe.latencies), float(np.percentile(probe.latencies, 99))
    report = (f"statuses {statuses}; RSS idle {idle_rss / 2**20:.0f} MiB, peak {peak_rss / 2**20:.0f} MiB; "
              f"health max {worst * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms "
              f"over {len(probe.latencies)} probes (max before the load: {idle_worst * 1000:.1f} ms; "
              f"load average {psutil.getloadavg()[0]:.1f})")
    print(report)
    # every body was either served exactly-shaped or refused (after waiting) before it was read, never another 5xx
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1, (report, results)
    for status, retry_after, error, shape in results:
        if status == 200:
            assert shape == [IMAGES, 1000]
        else:
            assert retry_after is not None and "memory budget" in error
    assert not probe.failures, probe.failures
    assert peak_rss < RSS_LIMIT, report
    assert p99 < HEALTH_P99_LIMIT_S and worst < HEALTH_MAX_LIMIT_S, report
