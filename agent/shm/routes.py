"""The HTTP face of the extension: Triton's `/v2/systemsharedmemory` routes, and the infer hook.

`install` adds the routes to the app (answering 404 with the flag to turn
it on when `--shared-memory` is off) and keeps the region table on it;
`regions_for` gives the infer handler the calling client's regions, or None
when the extension is off (the decoder then refuses region references).
The bearer-token check is the app's own middleware, in front of these routes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent import protocol
from agent.errors import AgentError, PayloadTooLarge

from .registry import RegionTable
from .tensors import ClientRegions

EXTENSION = "system_shared_memory"
BASE = "/v2/systemsharedmemory"
#: a register body is four short fields
_MAX_BODY_BYTES = 64 << 10


@dataclass(frozen=True)
class SharedMemory:
    table: RegionTable
    #: with a token, regions belong to the token presented; without one, to the server
    owner_by_token: bool

    def owner(self, headers: Mapping[str, str]) -> str:
        """`headers`: aiohttp's (any case) or the fast path's (lower-case names)."""
        if not self.owner_by_token:
            return ""
        return hashlib.sha256(headers.get("authorization", "").encode()).hexdigest()


SHARED_MEMORY = web.AppKey("shared_memory", SharedMemory)


def regions_for(app: web.Application, headers: Mapping[str, str]) -> ClientRegions | None:
    """The caller's regions for one inference request; None when the extension is off.

    The app and the headers are passed in: inference requests skip the router (and may never
    become an aiohttp request at all: `agent.fast_http`).
    """
    shm = app.get(SHARED_MEMORY)
    return None if shm is None else ClientRegions(shm.table, shm.owner(headers))


def advertise(app: web.Application, metadata: dict[str, Any]) -> dict[str, Any]:
    """Server metadata with the extension listed when it is on."""
    if SHARED_MEMORY in app:
        metadata["extensions"] = [*metadata.get("extensions", ()), EXTENSION]
    return metadata


def _error(e: AgentError) -> web.Response:
    return web.Response(status=e.status, body=protocol.encode_error(e.message), content_type="application/json")


def _json(doc: object) -> web.Response:
    return web.Response(body=protocol.dumps(doc), content_type="application/json")


Handler = Callable[[web.Request, SharedMemory, str], Awaitable[web.Response]]


def _route(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def wrapped(request: web.Request) -> web.Response:
        shm = request.app.get(SHARED_MEMORY)
        if shm is None:
            return web.Response(status=404, content_type="application/json", body=protocol.encode_error(
                "system shared memory is off on this server; start it with `outpost serve --shared-memory`"))
        try:
            return await handler(request, shm, shm.owner(request.headers))
        except AgentError as e:
            return _error(e)
    return wrapped


async def _register(request: web.Request, shm: SharedMemory, owner: str) -> web.Response:
    if request.content_length is not None and request.content_length > _MAX_BODY_BYTES:
        return _error(PayloadTooLarge(request.content_length, _MAX_BODY_BYTES, "register body"))
    body = protocol.parse_json(await request.read() or b"{}")
    shm.table.register(owner, request.match_info["name"], body)
    return web.Response(status=200)


async def _unregister(request: web.Request, shm: SharedMemory, owner: str) -> web.Response:
    shm.table.unregister(owner, request.match_info.get("name"))
    return web.Response(status=200)


async def _status(request: web.Request, shm: SharedMemory, owner: str) -> web.Response:
    return _json(shm.table.status(owner, request.match_info.get("name")))


def install(app: web.Application, enabled: bool, owner_by_token: bool) -> None:
    """Add the routes (before any catch-all route); keep the table on the app when enabled."""
    if enabled:
        table = RegionTable()
        app[SHARED_MEMORY] = SharedMemory(table, owner_by_token)

        async def close(_: web.Application) -> None:
            table.close()

        app.on_cleanup.append(close)
    r = app.router
    r.add_post(BASE + "/region/{name}/register", _route(_register))
    r.add_post(BASE + "/region/{name}/unregister", _route(_unregister))
    r.add_post(BASE + "/unregister", _route(_unregister))
    r.add_get(BASE + "/status", _route(_status))
    r.add_get(BASE + "/region/{name}/status", _route(_status))
