"""Request handlers: parse, authorize, call one service, answer JSON. Nothing else."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from sqlalchemy import text

from contract import ALGORITHM

from ..auth import (
    ADMIN,
    READ,
    WRITE,
    authorize,
    authorize_device_self,
    bearer,
    create_operator_token,
    revoke_operator_token,
)
from ..bundles import bundle_view
from ..devices import parse_selector
from ..errors import InvalidRequest
from .common import fleet, principal, query_number, read_json
from .openapi import DOCUMENT

routes = web.RouteTableDef()


@routes.get("/api/v1/health", allow_head=False)
async def health(request: web.Request) -> web.Response:
    try:
        async with fleet(request).db.read() as s:
            await s.execute(text("SELECT 1"))
    except Exception:
        return web.json_response({"status": "degraded", "database": "unreachable"}, status=503)
    return web.json_response({"status": "ok", "database": "ok", "time": time.time()})


@routes.get("/api/v1/openapi.json", allow_head=False)
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)


@routes.get("/api/v1/keys/assignment", allow_head=False)
async def assignment_key(request: web.Request) -> web.Response:
    await principal(request)
    signer = fleet(request).signer
    return web.json_response({"algorithm": ALGORITHM, "key_id": signer.key_id,
                              "public_key_pem": signer.public_pem.decode()})


@routes.post("/api/v1/tokens")
async def create_token(request: web.Request) -> web.Response:
    authorize(await principal(request), ADMIN)
    body = await read_json(request, "TokenCreate")
    token_id, secret = await create_operator_token(fleet(request).db, body["role"], body.get("name", ""))
    return web.json_response({"id": token_id, "role": body["role"], "token": secret}, status=201)


@routes.delete("/api/v1/tokens/{token_id}")
async def revoke_token(request: web.Request) -> web.Response:
    authorize(await principal(request), ADMIN)
    f = fleet(request)
    await revoke_operator_token(f.db, request.match_info["token_id"])
    f.principals.clear()  # this process at once; the others through the revocations table
    return web.json_response({"revoked": request.match_info["token_id"]})


@routes.post("/api/v1/enroll-tokens")
async def create_enroll_token(request: web.Request) -> web.Response:
    p = await principal(request)
    authorize(p, WRITE)
    body = await read_json(request, "EnrollTokenCreate")
    out = await fleet(request).devices.create_enroll_token(p.id, int(body.get("uses", 1)),
                                                           float(body.get("ttl_s", 86400)), body.get("labels", {}))
    return web.json_response(out, status=201)


@routes.post("/api/v1/enroll")
async def enroll(request: web.Request) -> web.Response:
    f = fleet(request)
    f.enroll_limiter.hit(request.remote or "unknown")
    secret = bearer(request.headers.get("Authorization"))
    await f.devices.check_enroll_token(secret)  # credentials before the body: anonymous input stays unparsed
    body = await read_json(request, "Enroll")
    out = await f.devices.enroll(secret, body.get("name", ""), body.get("labels", {}))
    return web.json_response(out, status=201)


@routes.get("/api/v1/devices", allow_head=False)
async def list_devices(request: web.Request) -> web.Response:
    authorize(await principal(request), READ)
    selector = parse_selector(request.query.getall("label", []))
    return web.json_response({"devices": await fleet(request).devices.list_devices(selector)})


@routes.get("/api/v1/devices/{device_id}", allow_head=False)
async def show_device(request: web.Request) -> web.Response:
    device_id = request.match_info["device_id"]
    authorize(await principal(request), READ, device_id)
    return web.json_response(await fleet(request).devices.show(device_id))


@routes.delete("/api/v1/devices/{device_id}")
async def delete_device(request: web.Request) -> web.Response:
    device_id = request.match_info["device_id"]
    authorize(await principal(request), WRITE)
    f = fleet(request)
    await f.devices.delete(device_id)
    f.principals.forget_device(device_id)
    f.assignments.forget(device_id)
    return web.json_response({"deleted": device_id})


@routes.put("/api/v1/devices/{device_id}/labels")
async def set_labels(request: web.Request) -> web.Response:
    device_id = request.match_info["device_id"]
    authorize(await principal(request), WRITE)
    body = await read_json(request, "LabelsSet")
    return web.json_response(await fleet(request).devices.set_labels(device_id, body["labels"]))


@routes.get("/api/v1/devices/{device_id}/assignment", allow_head=False)
async def get_assignment(request: web.Request) -> web.Response:
    device_id = request.match_info["device_id"]
    authorize(await principal(request), READ, device_id)
    f = fleet(request)
    serial = query_number(request, "serial", 0, 2**62, integer=True)
    wait_s = query_number(request, "wait_s", 0, f.config.long_poll_max_s)
    if not f.assignments.knows(device_id):
        f.admission.admit_cold("first assignment read")
    if serial is None:
        return web.json_response(await f.assignments.document(device_id))
    doc = await f.assignments.wait(device_id, int(serial),
                                   f.config.long_poll_default_s if wait_s is None else wait_s)
    return web.json_response(doc)


@routes.put("/api/v1/devices/{device_id}/assignment")
async def set_assignment(request: web.Request) -> web.Response:
    device_id = request.match_info["device_id"]
    authorize(await principal(request), WRITE)
    body = await read_json(request, "AssignmentSet")
    serial = await fleet(request).assignments.set(device_id, body["bundles"])
    return web.json_response({"device_id": device_id, "serial": serial, "bundles": sorted(body["bundles"])})


@routes.post("/api/v1/devices/{device_id}/reports")
async def post_report(request: web.Request) -> web.Response:
    device_id = request.match_info["device_id"]
    authorize_device_self(await principal(request), device_id)
    body = await read_json(request, "Report")
    f = fleet(request)
    points, bumped = await f.report_batcher.submit(device_id, body)
    if bumped:
        f.notifier.notify([device_id])
    return web.json_response({"accepted": True, "points": points}, status=202)


@routes.get("/api/v1/devices/{device_id}/telemetry", allow_head=False)
async def telemetry(request: web.Request) -> web.Response:
    device_id = request.match_info["device_id"]
    authorize(await principal(request), READ, device_id)
    since = query_number(request, "since", 0, 1e11)
    until = query_number(request, "until", 0, 1e11)
    limit = query_number(request, "limit", 1, 10000, integer=True)
    points = await fleet(request).reports.series(device_id, since, until, int(limit or 1000))
    return web.json_response({"device_id": device_id, "points": points})


@routes.get("/api/v1/bundles", allow_head=False)
async def list_bundles(request: web.Request) -> web.Response:
    authorize(await principal(request), READ)
    name = request.query.get("name") or None
    if name is not None and len(name) > 128:
        raise InvalidRequest("query name: too long")
    return web.json_response({"bundles": await fleet(request).bundles.list_versions(name)})


@routes.get("/api/v1/bundles/{name}/{version}", allow_head=False)
async def show_bundle(request: web.Request) -> web.Response:
    authorize(await principal(request), READ)
    b = await fleet(request).bundles.get(request.match_info["name"], request.match_info["version"])
    return web.json_response(bundle_view(b, full=True))


@routes.post("/api/v1/bundles/{name}/{version}/revoke")
async def revoke_bundle(request: web.Request) -> web.Response:
    authorize(await principal(request), WRITE)
    body = await read_json(request, "Revoke")
    f = fleet(request)
    view, told = await f.bundles.revoke(request.match_info["name"], request.match_info["version"],
                                        body.get("reason", ""))
    f.notifier.notify(told)
    out: dict[str, Any] = {**view, "devices_told": len(told)}
    return web.json_response(out)
