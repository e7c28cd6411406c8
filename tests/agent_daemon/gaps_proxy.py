"""A loopback HTTP proxy in front of a real fleet: counts what it forwards, and can shed or hold requests.

The agent under test is enrolled through the proxy, so every byte it
exchanges with the fleet passes here: archive bytes served are counted per
path, the first N requests of a route can be answered 503 + Retry-After (as
the fleet's admission control does under a cold-start herd), and held
long-polls can be kept for their whole wait (a fleet instance that is not
told of the change), so that only an MQTT nudge can cut them short.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tests.agent_daemon.harness import free_port

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


@dataclass
class Seen:
    at: float
    method: str
    path: str
    status: int
    body: bytes = b""


@dataclass
class FleetProxy:
    upstream: str
    port: int = field(default_factory=free_port)
    #: route key (see `route`) -> how many of its requests are still to be shed with 503
    shed: dict[str, int] = field(default_factory=dict)
    retry_after: str = "1"
    #: hold long-polls (``serial=`` in the query) for this long before forwarding them
    hold_long_polls_s: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    #: long-polls that reached the hold (the agent is waiting on one)
    held: int = 0
    archive_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def route(method: str, path: str) -> str:
        if path.endswith("/enroll"):
            return "enroll"
        if path.endswith("/reports"):
            return "report"
        if "/assignment" in path and method == "GET":
            return "assignment"
        if path.endswith("/archive"):
            return "archive"
        return "other"

    def requests(self, route: str) -> list[Seen]:
        return [s for s in list(self.seen) if self.route(s.method, s.path) == route]

    # ------------------------------------------------------------------ server

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        route = self.route(request.method, request.path)
        if self.shed.get(route, 0) > 0:
            self.shed[route] -= 1
            self.seen.append(Seen(time.monotonic(), request.method, request.path, 503, body))
            return web.json_response({"error": "busy (test proxy)"}, status=503,
                                     headers={"Retry-After": self.retry_after})
        if self.hold_long_polls_s and route == "assignment" and "serial" in request.query:
            self.held += 1
            await asyncio.sleep(self.hold_long_polls_s)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        assert self._session is not None
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body or None, allow_redirects=False) as up:
            self.seen.append(Seen(time.monotonic(), request.method, request.path, up.status, body))
            resp = web.StreamResponse(status=up.status,
                                      headers={k: v for k, v in up.headers.items() if k.lower() not in HOP})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                if route == "archive":
                    self.archive_bytes[request.path] += len(chunk)
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    def __enter__(self) -> FleetProxy:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None

        async def start() -> None:
            self._session = aiohttp.ClientSession(auto_decompress=False,
                                                  timeout=aiohttp.ClientTimeout(total=None))
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, handler_cancellation=True)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.create_task(start())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fleet-proxy", daemon=True)
        self._thread.start()
        assert ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@dataclass
class ProxiedFleet:
    """What `harness.Agent` needs of a fleet (its URL, an enrollment token), pointing at the proxy."""

    proxy: FleetProxy
    fleet: object

    @property
    def url(self) -> str:
        return self.proxy.url

    def enroll_token(self) -> str:
        return str(self.fleet.enroll_token())  # type: ignore[attr-defined]
