"""The fleet's HTTP API (aiohttp), versioned under /api/v1."""

from __future__ import annotations

from aiohttp import web

from ..service import Fleet
from . import handlers, transfer
from .common import FLEET, error_middleware
from .openapi import DOCUMENT


def build_app(fleet: Fleet | None = None) -> web.Application:
    """The application; `fleet` may be set later (cleanup_ctx) under `FLEET`."""
    max_body = fleet.config.max_json_body_bytes if fleet is not None else 1 << 20
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body)
    if fleet is not None:
        app[FLEET] = fleet
    app.add_routes(handlers.routes)
    app.add_routes(transfer.routes)
    return app


__all__ = ["DOCUMENT", "FLEET", "build_app"]
