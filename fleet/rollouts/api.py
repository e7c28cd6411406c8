"""HTTP API of rollouts under /api/v1/rollouts: thin handlers over the store and the engine."""

from __future__ import annotations

from typing import Any, cast

from aiohttp import web

from ..api import openapi
from ..api.common import principal, read_json
from ..auth import READ, WRITE, authorize
from ..errors import InvalidRequest
from . import machine
from .engine import RolloutEngine
from .store import view

ENGINE = web.AppKey("rollout_engine", RolloutEngine)
routes = web.RouteTableDef()

_NUM = {"type": "number", "minimum": 0, "maximum": 1e9}
_STAGE = {"type": "object", "additionalProperties": False, "properties": {
    "devices": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    "percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
    "soak_s": _NUM, "min_requests": {"type": "integer", "minimum": 0, "maximum": 10**12}}}
CREATE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["bundle"], "additionalProperties": False, "properties": {
        "bundle": {"type": "string", "pattern": "^[^@]{1,128}@[^@]{1,64}$"},
        "selector": {"type": "object", "additionalProperties": False, "properties": {
            "labels": {"type": "object", "maxProperties": 64, "additionalProperties": {"type": "string",
                                                                                     "maxLength": 200}},
            "devices": {"type": "array", "maxItems": 100_000, "items": {"type": "string", "maxLength": 32}}}},
        "stages": {"type": "array", "minItems": 1, "maxItems": 20, "items": _STAGE},
        "soak_s": _NUM, "min_requests": {"type": "integer", "minimum": 0, "maximum": 10**12},
        "hardware_label": {"type": "string", "maxLength": 63},
        "gates": {"type": "object", "additionalProperties": False, "properties": {
            "p95_ms": {"type": ["number", "null"], "exclusiveMinimum": 0},
            "max_p95_regression_pct": {"type": ["number", "null"], "minimum": 0, "maximum": 10000},
            "max_error_rate": {"type": "number", "minimum": 0, "maximum": 1},
            "max_nan_rate": {"type": "number", "minimum": 0, "maximum": 1},
            "allowed_engines": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "string"}},
            "max_install_failure_rate": {"type": "number", "minimum": 0, "maximum": 1},
            "install_timeout_s": _NUM, "max_unhealthy_rate": {"type": "number", "minimum": 0, "maximum": 1},
            "failure_limit": {"type": "integer", "minimum": 0, "maximum": 100},
            "inconclusive_deadline_s": _NUM, "baseline_window_s": _NUM,
            "metrics": {"type": "object", "maxProperties": 16, "additionalProperties": {
                "type": "object", "additionalProperties": False,
                "properties": {"min": {"type": "number"}, "max": {"type": "number"}}}}}}}}
_ID = {"name": "rollout_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 200}}
_ACTION = {"name": "action", "in": "path", "required": True,
           "schema": {"enum": ["pause", "resume", "abort", "promote"]}}
_STATUS = {"name": "status", "in": "query", "required": False,
           "schema": {"enum": ["running", "paused", "succeeded", "rolled_back", "aborted"]}}


def _publish() -> None:
    """Add the rollout endpoints to the fleet's OpenAPI document (served, validated and fuzzed like the rest)."""
    openapi.SCHEMAS["RolloutCreate"] = CREATE_SCHEMA
    op = openapi._op
    openapi.DOCUMENT["paths"].update({
        "/api/v1/rollouts": {
            "get": op("List rollouts, newest first", params=[_STATUS], errors=("400", "401", "403")),
            "post": op("Start a staged rollout of a bundle version", "201", body="RolloutCreate",
                       errors=("400", "401", "403", "404", "409")),
        },
        "/api/v1/rollouts/{rollout_id}": {"parameters": [_ID], "get": op(
            "A rollout: stages, latest gate evaluation, audit log")},
        "/api/v1/rollouts/{rollout_id}/{action}": {"parameters": [_ID, _ACTION], "post": op(
            "Operator action: pause, resume, abort (with rollback), promote (skip this stage's gates)",
            errors=("400", "401", "403", "404", "409"))},
    })


_publish()


def engine(request: web.Request) -> RolloutEngine:
    return request.app[ENGINE]


async def act(request: web.Request, rollout_id: str, action: str, actor: str) -> dict[str, Any]:
    if action not in ("pause", "resume", "abort", "promote"):
        raise InvalidRequest(f"unknown action {action!r}; one of pause, resume, abort, promote")
    e = engine(request)
    r = await e.store.act(rollout_id, cast(machine.Action, action), actor)
    e.kick()
    return view(r)


async def show(request: web.Request, rollout_id: str) -> dict[str, Any]:
    store = engine(request).store
    r = await store.get(rollout_id)
    counts = (await store.stage_counts([r.id])).get(r.id, {})
    return view(r, counts, await store.events(r.id))


@routes.post("/api/v1/rollouts")
async def create(request: web.Request) -> web.Response:
    p = await principal(request)
    authorize(p, WRITE)
    body = await read_json(request, "RolloutCreate")
    e = engine(request)
    r = await e.store.create(body, p.id)
    e.kick()
    return web.json_response(view(r), status=201)


@routes.get("/api/v1/rollouts", allow_head=False)
async def list_rollouts(request: web.Request) -> web.Response:
    authorize(await principal(request), READ)
    status = request.query.get("status") or None
    if status is not None and status not in machine.ACTIVE + machine.FINAL:
        raise InvalidRequest(f"query status: one of {', '.join(machine.ACTIVE + machine.FINAL)}")
    store = engine(request).store
    rows = await store.all(status)
    counts = await store.stage_counts([r.id for r in rows])
    return web.json_response({"rollouts": [view(r, counts.get(r.id)) for r in rows]})


@routes.get("/api/v1/rollouts/{rollout_id}", allow_head=False)
async def show_rollout(request: web.Request) -> web.Response:
    authorize(await principal(request), READ)
    return web.json_response(await show(request, request.match_info["rollout_id"]))


@routes.post("/api/v1/rollouts/{rollout_id}/{action}")
async def action(request: web.Request) -> web.Response:
    p = await principal(request)
    authorize(p, WRITE)
    return web.json_response(await act(request, request.match_info["rollout_id"], request.match_info["action"],
                                       p.id))
