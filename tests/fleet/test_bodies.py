"""Request bodies as slow links and hostile clients send them: trickled, large, deeply nested."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from typing import Any

from .conftest import Harness


async def _trickle(url: str, path: str, token: str, parts: list[bytes], pause_s: float) -> tuple[int, Any]:
    """POST with a Content-Length, the body written in separate TCP writes `pause_s` apart."""
    u = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        body_len = sum(len(p) for p in parts)
        writer.write((f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {token}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {body_len}\r\n"
                      "Connection: close\r\n\r\n").encode())
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(pause_s)
            writer.write(part)
            await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _window(end: float, models: int) -> dict[str, Any]:
    return {"start": end - 10, "end": end, "requests": 10, "errors": 0, "cpu_percent": 12.5,
            "models": {f"detector-{m:02d}": {"requests": 10, "errors": 0, "p50_ms": 1.0, "p95_ms": 2.0,
                                          "p99_ms": 3.0} for m in range(models)}}


async def test_a_body_trickled_in_several_writes_is_read_whole(api: Harness) -> None:
    device, cred = await api.enroll("slow-link")
    now = time.time()
    body = json.dumps({"health": {"status": "ok"}, "telemetry": [_window(now, 2)]}).encode()
    third = len(body) // 3
    parts = [body[:third], body[third:2 * third], body[2 * third:]]
    status, answer = await _trickle(api.url, f"/api/v1/devices/{device}/reports", cred, parts, pause_s=0.3)
    assert status == 202, answer
    assert answer["points"] == 1


async def test_a_300_kb_report_in_one_write_is_stored(api: Harness) -> None:
    device, cred = await api.enroll("big-report")
    now = time.time()
    report = {"health": {"status": "ok"}, "telemetry": [_window(now - 10 * i, 32) for i in range(100)]}
    body = json.dumps(report).encode()
    assert 300_000 <= len(body) < api.fleet.config.max_json_body_bytes
    status, answer = await _trickle(api.url, f"/api/v1/devices/{device}/reports", cred, [body], pause_s=0)
    assert status == 202, answer
    assert answer["points"] == 100


def _nested(depth: int, key: str = "labels") -> bytes:
    """A known field holding a deep list: the schema's type error once printed the whole value (RecursionError)."""
    return b'{"' + key.encode() + b'": ' + b"[" * depth + b"]" * depth + b"}"


async def test_deep_json_is_a_400_on_every_route_that_reads_json(api: Harness) -> None:
    device, cred = await api.enroll("deep")
    routes = [("POST", f"/api/v1/devices/{device}/reports", cred, "health"),
              ("PUT", f"/api/v1/devices/{device}/labels", api.admin, "labels"),
              ("POST", "/api/v1/enroll-tokens", api.admin, "labels")]
    for depth in (100, 300, 600, 970):  # past the decoder's own limit, and below it (where jsonschema recursed)
        for method, path, token, key in routes:
            r = await api.call(method, path, token, data=_nested(depth, key),
                               headers={"Content-Type": "application/json"})
            assert r.status == 400, (path, depth, r.status, r.raw[:200])
            assert "nested deeper" in r.body["error"]
    # a legitimate body a few levels deep is still accepted
    r = await api.call("PUT", f"/api/v1/devices/{device}/labels", api.admin, json={"labels": {"site": "x"}})
    assert r.status == 200, r.body


async def test_enroll_checks_the_token_before_reading_the_body(api: Harness) -> None:
    deep = _nested(970)
    for token in (None, "enr_forged", api.admin):
        r = await api.call("POST", "/api/v1/enroll", token, data=deep, headers={"Content-Type": "application/json"})
        assert r.status == 401, (token, r.status, r.raw[:200])
        r = await api.call("POST", "/api/v1/enroll", token, data=b"{not json",
                           headers={"Content-Type": "application/json"})
        assert r.status == 401, (token, r.status)
    # with a valid token, the same body is a 400 and the token's use is not spent
    r = await api.call("POST", "/api/v1/enroll-tokens", api.admin, json={"uses": 1})
    token = r.body["token"]
    r = await api.call("POST", "/api/v1/enroll", token, data=deep, headers={"Content-Type": "application/json"})
    assert r.status == 400 and "nested deeper" in r.body["error"]
    r = await api.call("POST", "/api/v1/enroll", token, json={"name": "ok"})
    assert r.status == 201, r.body
