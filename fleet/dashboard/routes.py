"""The dashboard's pages: server-rendered HTML (Jinja2), uPlot charts served from this package.

Auth: a browser logs in with an operator token and gets a signed session
cookie (HttpOnly, SameSite=Strict, Secure under TLS); `Authorization: Bearer`
works too (scripts, curl). Anonymous page requests go to the login page.
Every state-changing form carries the session's CSRF token; a cookie-borne
POST without it is 403. Viewers see everything and no action buttons, and
their POSTs are 403 anyway.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jinja2
from aiohttp import web
from sqlalchemy import select

from ..api.common import FLEET, fleet
from ..auth import READ, ROLES, WRITE, Principal, authenticate, authorize, bearer
from ..db import OperatorToken
from ..devices import parse_selector
from ..errors import FleetError, Forbidden, InvalidRequest, Unauthenticated
from ..rollouts import api as rollout_api
from ..rollouts.machine import ACTIVE
from . import queries
from .session import COOKIE, LOGIN_CSRF_COOKIE, Session, SessionSigner, load_or_create_key

HERE = pathlib.Path(__file__).resolve().parent
SIGNER = web.AppKey("dashboard_signer", SessionSigner)
PER_PAGE = 50
_CSP = "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:; frame-ancestors 'none'"

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                          autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


_env.filters["when"] = _when
_env.filters["num"] = _num
_env.filters["pct"] = lambda v: "-" if v is None else f"{100 * v:.2f}%"

routes = web.RouteTableDef()


class Viewer:
    """Who is looking, and how (cookie sessions need CSRF on POST; Bearer requests do not)."""

    def __init__(self, principal: Principal, session: Session | None, csrf: str | None) -> None:
        self.principal = principal
        self.session = session
        self.csrf = csrf

    @property
    def can_act(self) -> bool:
        role = self.principal.role or "viewer"
        return ROLES.index(role) >= ROLES.index(WRITE)


async def _viewer(request: web.Request) -> Viewer | None:
    f = fleet(request)
    if request.headers.get("Authorization"):
        p = await authenticate(f.db, bearer(request.headers.get("Authorization")), f.principals)
        authorize(p, READ)
        return Viewer(p, None, None)
    signer = request.app[SIGNER]
    session = signer.read(request.cookies.get(COOKIE))
    if session is None:
        return None
    async with f.db.read() as s:
        role = (await s.execute(select(OperatorToken.role).where(OperatorToken.id == session.token_id,
                                                                 OperatorToken.revoked_at.is_(None)))).scalar()
    if role is None:
        return None
    return Viewer(Principal("operator", session.token_id, role), session, signer.csrf(session))


def _to_login(request: web.Request) -> web.HTTPFound:
    return web.HTTPFound(f"/dashboard/login?next={request.path_qs if request.method == 'GET' else '/dashboard/'}")


def render(name: str, status: int = 200, **ctx: Any) -> web.Response:
    html = _env.get_template(name).render(**ctx)
    return web.Response(text=html, status=status, content_type="text/html",
                        headers={"Content-Security-Policy": _CSP, "X-Frame-Options": "DENY",
                                 "Referrer-Policy": "same-origin", "Cache-Control": "no-store"})


PageHandler = Callable[[web.Request, "Viewer"], Awaitable[dict[str, Any]]]


def page(template: str) -> Callable[[PageHandler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Decorator: authenticate (or redirect to login), render `template` with the handler's context."""
    def wrap(handler: PageHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                viewer = await _viewer(request)
                if viewer is None:
                    raise _to_login(request)
                ctx = await handler(request, viewer)
            except Unauthenticated:
                raise _to_login(request) from None
            except FleetError as e:
                return render("error.html", status=_status(e), viewer=None, message=e.message, nav="")
            return render(template, viewer=viewer, **ctx)
        return run
    return wrap


def _status(e: FleetError) -> int:
    from ..api.common import _status as status
    return status(e)


@routes.get("/dashboard", allow_head=False)
@routes.get("/dashboard/", allow_head=False)
async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/dashboard/devices")


@routes.get("/dashboard/login", allow_head=False)
async def login_form(request: web.Request) -> web.StreamResponse:
    nonce = secrets.token_urlsafe(16)
    resp = render("login.html", viewer=None, csrf=nonce, next=_safe_next(request.query.get("next")), error="",
                  nav="")
    resp.set_cookie(LOGIN_CSRF_COOKIE, nonce, httponly=True, samesite="Strict", secure=request.secure,
                    path="/dashboard/login", max_age=3600)
    return resp


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/dashboard/") and "//" not in target else "/dashboard/devices"


@routes.post("/dashboard/login")
async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    expected = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not expected or not secrets.compare_digest(expected, str(form.get("csrf", ""))):
        return render("error.html", status=403, viewer=None, nav="",
                      message="the login form expired or came from another site; reload it and try again")
    token = str(form.get("token", "")).strip()
    f = fleet(request)
    try:
        p = await authenticate(f.db, token, f.principals)
        if p.is_device:
            raise Unauthenticated("a device credential cannot log in to the dashboard")
    except Unauthenticated as e:
        return render("login.html", status=401, viewer=None, csrf=expected, next=_safe_next(str(form.get("next"))),
                      error=e.message, nav="")
    cookie, _ = request.app[SIGNER].issue(p.id)
    resp = web.HTTPFound(_safe_next(str(form.get("next", ""))))
    resp.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", secure=request.secure, path="/dashboard",
                    max_age=int(request.app[SIGNER].ttl_s))
    resp.del_cookie(LOGIN_CSRF_COOKIE, path="/dashboard/login")
    raise resp


async def _checked_post(request: web.Request) -> tuple[Viewer, Any]:
    """A state-changing form: authenticated, and with the session's CSRF token unless it came with Bearer."""
    viewer = await _viewer(request)
    if viewer is None:
        raise Unauthenticated("log in first")
    form = await request.post()
    if viewer.session is not None and not request.app[SIGNER].check_csrf(viewer.session, str(form.get("csrf") or "")):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again")
    return viewer, form


@routes.post("/dashboard/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    try:
        await _checked_post(request)
    except FleetError as e:
        return render("error.html", status=_status(e), viewer=None, message=e.message, nav="")
    resp = web.HTTPFound("/dashboard/login")
    resp.del_cookie(COOKIE, path="/dashboard")
    raise resp


@routes.get("/dashboard/devices", allow_head=False)
@page("devices.html")
async def devices(request: web.Request, viewer: Viewer) -> dict[str, Any]:
    raw = [x for x in request.query.getall("label", []) if x.strip()]
    selector = parse_selector(raw)
    try:
        number = max(1, int(request.query.get("page", "1")))
    except ValueError:
        raise InvalidRequest("page: not a whole number") from None
    data = await queries.devices_page(fleet(request).db, selector, number, PER_PAGE)
    return {"nav": "devices", "data": data, "label": " ".join(raw), "labels": raw}


@routes.get("/dashboard/devices/{device_id}", allow_head=False)
@page("device.html")
async def device(request: web.Request, viewer: Viewer) -> dict[str, Any]:
    f = fleet(request)
    device_id = request.match_info["device_id"]
    shown = await f.devices.show(device_id)
    points = await f.reports.series(device_id, None, None, 2000)
    series: dict[str, list[float | None]] = {k: [] for k in ("ts", "p50", "p95", "p99", "requests", "cpu", "mem")}
    for p in points:
        m = p["metrics"]
        series["ts"].append(p["ts"])
        for key, suffix in (("p50", ".p50_ms"), ("p95", ".p95_ms"), ("p99", ".p99_ms")):
            vals = [v for k, v in m.items() if k.startswith("models.") and k.endswith(suffix)]
            series[key].append(max(vals) if vals else None)
        series["requests"].append(m.get("requests"))
        series["cpu"].append(m.get("cpu_percent"))
        mem = m.get("memory_bytes")
        series["mem"].append(mem / 2**20 if mem is not None else None)
    return {"nav": "devices", "d": shown, "series": series, "points": len(points)}


@routes.get("/dashboard/rollouts", allow_head=False)
@page("rollouts.html")
async def rollouts(request: web.Request, viewer: Viewer) -> dict[str, Any]:
    store = request.app[rollout_api.ENGINE].store
    rows = await store.all()
    counts = await store.stage_counts([r.id for r in rows])
    from ..rollouts.store import view
    return {"nav": "rollouts", "rollouts": [view(r, counts.get(r.id)) for r in rows]}


@routes.get("/dashboard/rollouts/{rollout_id}", allow_head=False)
@page("rollout.html")
async def rollout(request: web.Request, viewer: Viewer) -> dict[str, Any]:
    r = await rollout_api.show(request, request.match_info["rollout_id"])
    return {"nav": "rollouts", "r": r, "active": r["status"] in ACTIVE}


@routes.post("/dashboard/rollouts/{rollout_id}/{action}")
async def rollout_action(request: web.Request) -> web.StreamResponse:
    rollout_id = request.match_info["rollout_id"]
    try:
        viewer, _ = await _checked_post(request)
        authorize(viewer.principal, WRITE)
        await rollout_api.act(request, rollout_id, request.match_info["action"], viewer.principal.id)
    except Unauthenticated:
        raise _to_login(request) from None
    except FleetError as e:
        return render("error.html", status=_status(e), viewer=None, message=e.message, nav="")
    raise web.HTTPSeeOther(f"/dashboard/rollouts/{rollout_id}")


@routes.get("/dashboard/catalog", allow_head=False)
@page("catalog.html")
async def catalog(request: web.Request, viewer: Viewer) -> dict[str, Any]:
    return {"nav": "catalog", "services": await queries.catalog(fleet(request).db)}


def setup(app: web.Application) -> None:
    app.add_routes(routes)
    app.router.add_static("/dashboard/static/", HERE / "static", append_version=False)

    async def _signer(app: web.Application) -> AsyncIterator[None]:
        app[SIGNER] = SessionSigner(load_or_create_key(app[FLEET].config.key_dir))
        yield

    app.cleanup_ctx.append(_signer)
