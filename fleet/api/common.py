"""The HTTP edge: the one error mapper, request parsing, and the app's typed state.

Every handler goes through `error_middleware`: a `FleetError` becomes its
status and ``{"error": message}``; aiohttp's own HTTP errors keep their status
with a JSON body; anything else is logged here and answered with a bare 500,
so no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from jsonschema.exceptions import best_match

from ..auth import DEVICE_PREFIX, Principal, authenticate, bearer, hash_secret
from ..errors import (
    BundleRejected,
    Busy,
    Conflict,
    FleetError,
    Forbidden,
    Gone,
    InvalidRequest,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthenticated,
)
from ..service import Fleet
from .openapi import validator

log = logging.getLogger("fleet.api")
FLEET = web.AppKey("fleet", Fleet)

STATUS: dict[type[FleetError], int] = {
    InvalidRequest: 400, Unauthenticated: 401, Forbidden: 403, NotFound: 404, Conflict: 409, Gone: 410,
    TooLarge: 413, BundleRejected: 422, RateLimited: 429, Busy: 503,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _status(e: FleetError) -> int:
    for cls in type(e).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    response = await _answer(request, handler)
    if not response.prepared:
        # Time spent in the fleet itself, so a client can tell its own queueing from ours.
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    return response


def _storable(text: str) -> bool:
    """PostgreSQL refuses NUL characters and lone surrogates in text; refuse them at the edge (400)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Deepest JSON nesting accepted. Every published body is a few levels deep; jsonschema and the
#: string check recurse once per level, so a bound far below the interpreter's recursion limit
#: turns a hostile ~1,000-deep body into a 400 instead of a RecursionError (500).
MAX_JSON_DEPTH = 32


def _check_structure(value: Any) -> None:
    """Refuse over-deep nesting and text PostgreSQL cannot store; iterative, so depth costs no stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not _storable(item):
                raise InvalidRequest("text with NUL characters or invalid Unicode")
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise InvalidRequest(f"body nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            for k, v in item.items():
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        else:
            stack.extend((v, depth + 1) for v in item)


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if not _storable(request.path) or not all(_storable(k) and _storable(v) for k, v in request.query.items()):
            raise InvalidRequest("path or query with NUL characters or invalid Unicode")
        return await handler(request)
    except FleetError as e:
        status = _status(e)
        headers: dict[str, str] = {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="outpost-fleet"'
        if isinstance(e, (RateLimited, Busy)):
            headers["Retry-After"] = str(math.ceil(e.retry_after_s))
        return error_response(status, e.message, headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After", "Content-Range")}
        return error_response(e.status, e.reason, headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal error")


def fleet(request: web.Request) -> Fleet:
    return request.app[FLEET]


async def principal(request: web.Request) -> Principal:
    f = fleet(request)
    token = bearer(request.headers.get("Authorization"))
    if token.startswith(DEVICE_PREFIX) and f.principals.get(hash_secret(token)) is None:
        f.admission.admit_cold("device credential check")  # a booting herd is spread, not queued
    return await authenticate(f.db, token, f.principals)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, up to `limit` bytes (TooLarge beyond), however many TCP segments it came in.

    `StreamReader.read(n)` answers with what has arrived so far, so one call would
    cut a body that a slow link delivers in several writes.
    """
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(limit)
    body = bytearray()
    while True:
        chunk = await request.content.read(limit + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise TooLarge(limit)


async def read_json(request: web.Request, schema: str) -> dict[str, Any]:
    """Parse and validate a JSON body against a published schema; an empty body is {}."""
    raw = await read_body(request, fleet(request).config.max_json_body_bytes)
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(raw, parse_constant=_no_constants)
        except RecursionError:
            raise InvalidRequest(f"body nested deeper than {MAX_JSON_DEPTH} levels") from None
        except ValueError as e:
            raise InvalidRequest(f"body is not valid JSON: {str(e)[:200]}") from None
    _check_structure(data)
    error = best_match(validator(schema).iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "body"
        raise InvalidRequest(f"{where}: {error.message[:300]}")
    assert isinstance(data, dict)
    return data


def query_number(request: web.Request, name: str, lo: float, hi: float, integer: bool = False) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise InvalidRequest(f"query {name}: not a {'whole ' if integer else ''}number") from None
    if not (lo <= value <= hi) or (isinstance(value, float) and not math.isfinite(value)):
        raise InvalidRequest(f"query {name}: must be between {lo:g} and {hi:g}")
    return value
