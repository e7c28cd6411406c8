"""The API's contract: the OpenAPI 3.1 document served at /api/v1/openapi.json.

Request bodies are validated against the very schemas published here
(`schema(name)`), so the document and the server cannot drift apart, and the
schemathesis suite fuzzes exactly what is enforced.
"""

from __future__ import annotations

import functools
from typing import Any

from jsonschema import Draft202012Validator

from contract.report import SCHEMAS as REPORT_SCHEMAS

_STR = {"type": "string", "maxLength": 200}
_LABEL_KEY = "^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"
_REF = "^[^@]{1,128}@[^@]{1,64}$"

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Labels": {"type": "object", "maxProperties": 64, "propertyNames": {"pattern": _LABEL_KEY},
               "additionalProperties": _STR},
    "TokenCreate": {"type": "object", "required": ["role"], "additionalProperties": False, "properties": {
        "role": {"enum": ["viewer", "operator", "admin"]}, "name": _STR}},
    "EnrollTokenCreate": {"type": "object", "additionalProperties": False, "properties": {
        "uses": {"type": "integer", "minimum": 1, "maximum": 100000},
        "ttl_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 31536000},
        "labels": {"$ref": "#/components/schemas/Labels"}}},
    "Enroll": {"type": "object", "additionalProperties": False, "properties": {
        "name": _STR, "labels": {"$ref": "#/components/schemas/Labels"}}},
    "LabelsSet": {"type": "object", "required": ["labels"], "additionalProperties": False, "properties": {
        "labels": {"$ref": "#/components/schemas/Labels"}}},
    "AssignmentSet": {"type": "object", "required": ["bundles"], "additionalProperties": False, "properties": {
        "bundles": {"type": "array", "maxItems": 64, "items": {"type": "string", "pattern": _REF}}}},
    "Revoke": {"type": "object", "additionalProperties": False, "properties": {
        "reason": {"type": "string", "maxLength": 1000}}},
    # The report a device sends is the wire contract's: one schema for both sides.
    **REPORT_SCHEMAS,
}


def _resp(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"type": "object"}}}}


_ERR = {code: {"description": text, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Error"}}}} for code, text in (
    ("400", "malformed input"), ("401", "no or bad credential"), ("403", "not allowed"),
    ("404", "not found"), ("409", "conflict"), ("410", "revoked"), ("413", "body too large"),
    ("422", "bundle refused"), ("429", "rate limited"),
    ("503", "busy: a device's first contact or report refused under load; retry after the Retry-After header"))}


def _op(summary: str, ok: str = "200", *, body: str | None = None, params: list[dict[str, Any]] | None = None,
        auth: bool = True, raw_body: bool = False, errors: tuple[str, ...] = ("400", "401", "403", "404"),
        ok_content: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {
        ok: {"description": "ok", "content": ok_content} if ok_content else _resp("ok"),
        **{e: _ERR[e] for e in errors}}}
    if not auth:
        op["security"] = []
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
    if raw_body:
        op["requestBody"] = {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}
    if params:
        op["parameters"] = params
    return op


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "maxLength": 200}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_DEV, _NAME, _VER = _path("device_id"), _path("name"), _path("version")
_RW = ("400", "401", "403", "404", "409")

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Outpost fleet", "version": "1"},
    "components": {"schemas": SCHEMAS, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/health": {"get": _op("Liveness and database reachability", auth=False, errors=())},
        "/api/v1/keys/assignment": {"get": _op("The fleet's assignment-signing public key", errors=("401",))},
        "/api/v1/tokens": {"post": _op("Create an operator token (admin)", "201", body="TokenCreate",
                                       errors=("400", "401", "403"))},
        "/api/v1/tokens/{token_id}": {"parameters": [_path("token_id")], "delete": _op(
            "Revoke an operator token (admin)")},
        "/api/v1/enroll-tokens": {"post": _op("Create an enrollment token", "201", body="EnrollTokenCreate",
                                              errors=("400", "401", "403"))},
        "/api/v1/enroll": {"post": _op("Enroll a device with an enrollment token as bearer", "201", body="Enroll",
                                       errors=("400", "401", "403", "429"))},
        "/api/v1/devices": {"get": _op("List devices", params=[_query("label", {
            "type": "array", "items": {"type": "string", "maxLength": 300}, "maxItems": 16})],
            errors=("400", "401", "403"))},
        "/api/v1/devices/{device_id}": {
            "parameters": [_DEV],
            "get": _op("Show a device"),
            "delete": _op("Delete a device and revoke its credential"),
        },
        "/api/v1/devices/{device_id}/labels": {"parameters": [_DEV], "put": _op("Replace labels", body="LabelsSet")},
        "/api/v1/devices/{device_id}/assignment": {
            "parameters": [_DEV],
            "get": _op("Signed assignment document; long-poll with serial and wait_s", params=[
                _query("serial", {"type": "integer", "minimum": 0, "maximum": 2**62}),
                _query("wait_s", {"type": "number", "minimum": 0, "maximum": 60})],
                errors=("400", "401", "403", "404", "503")),
            "put": _op("Set the device's bundles", body="AssignmentSet", errors=_RW),
        },
        "/api/v1/devices/{device_id}/reports": {"parameters": [_DEV], "post": _op(
            "Post a heartbeat with telemetry (device only)", "202", body="Report",
            errors=("400", "401", "403", "404", "413", "503"))},
        "/api/v1/devices/{device_id}/telemetry": {"parameters": [_DEV], "get": _op("Telemetry series", params=[
            _query("since", {"type": "number", "minimum": 0, "maximum": 1e11}),
            _query("until", {"type": "number", "minimum": 0, "maximum": 1e11}),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000})])},
        "/api/v1/bundles": {
            "get": _op("List bundles", params=[_query("name", {"type": "string", "maxLength": 128})],
                       errors=("400", "401", "403")),
            "post": _op("Push a packed bundle (streamed)", "201", raw_body=True,
                        errors=("400", "401", "403", "409", "413", "422")),
        },
        "/api/v1/bundles/{name}/{version}": {"parameters": [_NAME, _VER], "get": _op("Show a bundle")},
        "/api/v1/bundles/{name}/{version}/archive": {"parameters": [_NAME, _VER], "get": _op(
            "Download the archive (Range, ETag, If-None-Match)", errors=("401", "403", "404", "410"),
            ok_content={"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}})},
        "/api/v1/bundles/{name}/{version}/revoke": {"parameters": [_NAME, _VER], "post": _op(
            "Revoke a version", body="Revoke")},
    },
}


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """Validator for one component schema, resolving references inside this document."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": SCHEMAS}}
    return Draft202012Validator(schema)
