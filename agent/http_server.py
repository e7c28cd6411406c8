"""The HTTP edge: the Open Inference Protocol's REST routes over the data plane.

Handlers only parse, call the data plane and serialise; an `AgentError` is
turned into a response in exactly one place (`error_response`). The server is
an `AppRunner` + `TCPSite` pair wrapped in `HttpServer`, so the agent daemon
can embed it next to its other tasks; `outpost serve` is one such embedding.
Connections start on `agent.fast_http`, which answers small plain inference requests
on httptools without aiohttp's per-request objects and hands a connection to aiohttp
at its first other request; on aiohttp, plain inference POSTs still skip the router
and middleware chain (`_fast_infer`). On a small model inference requests are most of
the server's work, and those layers a visible share of it (bench/README.md, "HTTP
stacks and the hot path"). Both paths answer through one function (`_answer` ->
`_infer`), which returns a `Reply` that either front writes.

Defences (THREATS 28-35): the body limit is checked against Content-Length
before anything is read and again while streaming (so a chunked or compressed
body stops at the limit, 413); a body must fit the byte budget of bodies in
flight before it is read (`agent.admission`: it waits for room a short while,
first come first served, then 503 + Retry-After); big JSON
bodies are decoded off the event loop (`agent.decoding`); a body must arrive
within `body_timeout_s`; header lines, fields, counts and open connections are
capped; idle keep-alive sockets close; a client that disconnects cancels its
handler, which drops its queued request. Health and metrics never touch a model
queue, so they answer under overload. With a token, every route but the two
health probes needs `Authorization: Bearer <token>`.

Every non-2xx answer is JSON `{"error": ...}`: ours by `error_response`,
aiohttp's own (404, 405, an unexpected exception's 500) by the `json_errors`
middleware, and those of the HTTP parser (a malformed request line, headers over
the caps) by the connection handler that `_JsonErrorsSite` installs.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from aiohttp import StreamReader, hdrs, web
from aiohttp.web_protocol import RequestHandler

from runtime.timeouts import timeout

from . import decoding, fast_http, protocol
from .admission import ByteBudget, Reservation
from .config import ServerConfig
from .dataplane import DataPlane, deadline_after
from .errors import AgentError, InferenceFailed, InvalidRequest, PayloadTooLarge, Unauthorized, Unavailable
from .http_metrics import HttpEdgeCollector
from .shm import routes as shm  # [shm] Triton's system shared-memory extension

log = logging.getLogger(__name__)

DATAPLANE = web.AppKey("dataplane", DataPlane)
CONFIG = web.AppKey("server_config", ServerConfig)
BUDGET = web.AppKey("body_budget", ByteBudget)

#: A request may shorten its own deadline with this header (milliseconds), never lengthen it.
TIMEOUT_HEADER = "Outpost-Timeout-Ms"
HEADER_LENGTH = "Inference-Header-Content-Length"
_TIMEOUT_KEY, _HEADER_LENGTH_KEY = TIMEOUT_HEADER.lower(), HEADER_LENGTH.lower()
_BODY_TYPES = frozenset({"application/json", "application/octet-stream"})
_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def error_response(e: AgentError) -> web.Response:
    return error_reply(e).as_response()


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=protocol.dumps(doc), content_type="application/json")


# ---------------------------------------------------------------------------------- handlers


async def server_metadata(request: web.Request) -> web.Response:
    return _json(shm.advertise(request.app, request.app[DATAPLANE].server_metadata()))  # [shm]


async def health_live(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[DATAPLANE].server_live() else 503)


async def health_ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[DATAPLANE].server_ready() else 503)


async def model_metadata(request: web.Request) -> web.Response:
    try:
        doc = request.app[DATAPLANE].model_metadata(request.match_info["model"], request.match_info.get("version"))
    except AgentError as e:
        return error_response(e)
    return _json(doc)


async def model_ready(request: web.Request) -> web.Response:
    try:
        ready = request.app[DATAPLANE].model_ready(request.match_info["model"], request.match_info.get("version"))
    except AgentError as e:
        return error_response(e)
    return web.Response(status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[DATAPLANE].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def not_found(request: web.Request) -> web.Response:
    return _json({"error": f"no route {request.method} {request.path}"}, status=404)


async def infer(request: web.Request) -> web.Response:
    reply = await _infer(_AiohttpIncoming(request), request.app, request.match_info["model"],
                         request.match_info.get("version"))
    return reply.as_response()


@dataclass(slots=True)
class Reply:
    """An inference answer, built once and written by either front (aiohttp's, or `agent.fast_http`)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] | None = None
    #: the connection cannot be reused after this answer (its body stream is broken)
    close: bool = False

    def as_response(self) -> web.Response:
        response = web.Response(status=self.status, body=self.body, content_type=self.content_type,
                                headers=self.headers)
        if self.close:
            response.force_close()
        return response


def error_reply(e: AgentError) -> Reply:
    """The single AgentError -> HTTP mapping: status from the error, JSON body, Retry-After on 503."""
    headers = None
    if isinstance(e, Unavailable):
        headers = {"Retry-After": str(max(1, round(e.retry_after_s)))}
    elif isinstance(e, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="outpost"'}
    return Reply(e.status, protocol.encode_error(e.message), headers=headers)


class Incoming(Protocol):
    """What inference needs of a request, whichever front parsed it."""

    @property
    def headers(self) -> Mapping[str, str]:
        """Looked up by lower-case names (aiohttp's are case-insensitive; the fast path's are lower-case)."""

    @property
    def content_length(self) -> int | None: ...

    async def read_body(self, config: ServerConfig, held: Reservation, deadline: float) -> bytes | bytearray:
        """The whole body, reserved in `held` before each byte is kept (waiting for room until `deadline`)."""


class _AiohttpIncoming:
    __slots__ = ("request",)

    def __init__(self, request: web.Request) -> None:
        self.request = request

    @property
    def headers(self) -> Mapping[str, str]:
        return self.request.headers

    @property
    def content_length(self) -> int | None:
        return self.request.content_length

    async def read_body(self, config: ServerConfig, held: Reservation, deadline: float) -> bytes | bytearray:
        return await _read_body(self.request, config, held, deadline)


async def _infer(request: Incoming, app: web.Application, model: str, version: str | None) -> Reply:
    dp = app[DATAPLANE]
    config = app[CONFIG]
    headers = request.headers
    try:
        sm = dp.get(model, version)  # 404 before reading a byte of the body
        _check_content_type(headers.get("content-type"))
        deadline = _deadline(headers.get(_TIMEOUT_KEY), sm.config.timeout_ms)
        length = request.content_length
        if length is not None and length > config.max_body_bytes:
            raise PayloadTooLarge(length, config.max_body_bytes)
        with app[BUDGET].reservation() as held:  # held until the answer is built
            body = await request.read_body(config, held, deadline)
            regions = shm.regions_for(app, headers)  # [shm] None unless --shared-memory
            req = await decoding.decode_request(body, headers.get(_HEADER_LENGTH_KEY),
                                                regions.input_view if regions else None)
            del body
            placement = regions.plan_outputs(req) if regions else None  # [shm] 400 before any compute
            response = await dp.infer(model, sm.version, req, deadline)  # the version resolved above
            del req
            encoded = protocol.encode_response(placement.write(response) if placement else response)  # [shm]
    except AgentError as e:
        reply = error_reply(e)
        reply.close = isinstance(e, _UnreadableBody)  # aiohttp would fail again draining the rest of it
        return reply
    if encoded.header_length is None:
        return Reply(200, encoded.header)
    return Reply(200, encoded.body(), "application/octet-stream", {HEADER_LENGTH: str(encoded.header_length)})


async def infer_or_500(request: Incoming, app: web.Application, model: str, version: str | None,
                       path: str) -> Reply:
    """`_infer`, with a bug costing this request a JSON 500 (logged with its traceback) as `json_errors` does."""
    try:
        return await _infer(request, app, model, version)
    except Exception as e:
        log.exception("HTTP POST %s failed", path)
        return error_reply(InferenceFailed(f"internal error: {type(e).__name__}"))


class _UnreadableBody(InvalidRequest):
    """The body stream itself failed (bad compression): the connection cannot be reused."""


def _check_content_type(raw: str | None) -> None:
    if raw is None or raw in _BODY_TYPES:
        return  # none: v2 clients (tritonclient among them) often send none
    ctype = raw.partition(";")[0].strip().lower()
    if ctype not in _BODY_TYPES:
        raise InvalidRequest(f"unsupported content type {ctype!r}; send application/json, or "
                             f"application/octet-stream with {HEADER_LENGTH} (binary tensor data)")


def _deadline(raw: str | None, default_ms: float) -> float:
    if raw is None:
        return deadline_after(default_ms)
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not ms > 0:
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got {raw!r}")
    return deadline_after(min(ms, default_ms))


async def _read_body(request: web.Request, config: ServerConfig, held: Reservation,
                     deadline: float) -> bytes | bytearray:
    """The whole (decompressed) body, reserved in the byte budget before each byte is kept.

    Only the Content-Length reservation, made before anything is held, may wait for room
    (until the deadline at most); a body's growth past that is refused at once (no hold-and-wait).
    """
    limit = config.max_body_bytes
    length = request.content_length
    if length is not None:
        await held.admit(length, config.body_budget_wait_s, deadline)
    content = request.content
    try:
        if content.is_eof():  # the whole body came with the headers (every small request): no task, no timer
            whole = content.read_nowait()
            if len(whole) > limit:  # decompressed past the limit
                raise PayloadTooLarge(None, limit)
            held.ensure(len(whole))
            return whole
        async with timeout(config.body_timeout_s):
            return await _receive(content, limit, held)
    except asyncio.TimeoutError:
        raise InvalidRequest(f"request body did not arrive within {config.body_timeout_s:g} s") from None
    except web.RequestPayloadError as e:  # a body that is not what its Content-Encoding says
        encoding = request.headers.get("Content-Encoding", "")
        raise _UnreadableBody(f"the body could not be read as Content-Encoding {encoding!r}: "
                             f"{e.__cause__ or e}") from None


async def _receive(content: StreamReader, limit: int, held: Reservation) -> bytearray:
    body = bytearray()  # grown chunk by chunk (realloc moves pages, no copy): never a 60 MB memset on the loop
    while chunk := await content.readany():
        end = len(body) + len(chunk)
        if end > limit:  # a chunked or compressed body past the limit
            raise PayloadTooLarge(None, limit)
        held.ensure(end)
        body.extend(chunk)
    return body


# ---------------------------------------------------------------------------------- app


_NO_TOKEN = Unauthorized("missing or wrong bearer token")


def _bearer_ok(headers: Mapping[str, str], expected: bytes) -> bool:
    """`headers` looked up by lower-case name: aiohttp's are case-insensitive, the fast path's lower-case."""
    return hmac.compare_digest(headers.get("authorization", "").encode(), expected)


def _auth_middleware(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path not in _OPEN_PATHS and not _bearer_ok(request.headers, expected):
            return error_response(_NO_TOKEN)
        return await handler(request)

    return auth


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Outermost: aiohttp's own error answers (404, 405, 413, a bug's 500) as JSON bodies too."""
    try:
        response = await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _as_json_error(e)
    except AgentError as e:
        return error_response(e)
    except Exception as e:  # a bug costs one request a JSON 500, and is logged with its traceback
        log.exception("HTTP %s %s failed", request.method, request.path)
        return error_response(InferenceFailed(f"internal error: {type(e).__name__}"))
    if response.status >= 400 and response.content_type != "application/json":
        response = _as_json_error(response)
    return _close_if_unread(request, response)


def _close_if_unread(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    if response.status >= 400 and "Content-Encoding" in request.headers and not request.content.is_eof():
        # refused before its body was read: aiohttp would drain a compressed body it cannot
        # decode into an exception logged per request; close instead
        response.force_close()
    return response


#: the inference routes as plain paths; anything else (percent-escapes, a query) takes the router
_FAST_INFER = re.compile(fast_http.INFER_PATH)


_ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _answer(app: web.Application, token: str | None) -> fast_http.Answer:
    """Inference as both dispatchers give it: the bearer check, then `_infer` with a bug's JSON 500."""
    expected = f"Bearer {token}".encode() if token else None

    async def answer(request: Incoming, model: str, version: str | None, path: str) -> Reply:
        if expected is not None and not _bearer_ok(request.headers, expected):
            return error_reply(_NO_TOKEN)
        return await infer_or_500(request, app, model, version, path)

    return answer


def _fast_infer(routed: _ServerHandler, answer: fast_http.Answer) -> _ServerHandler:
    """The aiohttp server's request handler: inference straight to `answer`, every other request through the app.

    The router and the middleware chain cost several microseconds per request, a visible share of
    a small model's whole request (bench/README.md, "HTTP stacks"); inference is the route that runs
    thousands of times a second, so it skips them and gets here what they give it: the bearer check
    and a bug's JSON 500. `Expect: 100-continue` goes through the app, which answers it. (Small
    inference requests mostly never reach aiohttp at all: `agent.fast_http`.)
    """

    async def handle(base: web.BaseRequest) -> web.StreamResponse:
        request = cast(web.Request, base)  # the AppRunner's server makes web.Request objects
        m = _FAST_INFER.fullmatch(request.raw_path) if request.method == "POST" else None
        if m is None or hdrs.EXPECT in request.headers:
            return await routed(request)
        reply = await answer(_AiohttpIncoming(request), m[1], m[2], request.path)
        return _close_if_unread(request, reply.as_response())

    return handle


def _as_json_error(response: web.StreamResponse) -> web.Response:
    text = response.text if isinstance(response, web.Response) and response.text else None
    message = (text or response.reason or str(response.status)).strip()
    headers = {k: v for k, v in response.headers.items() if k in ("Allow", "Retry-After", "WWW-Authenticate")}
    return web.Response(status=response.status, body=protocol.encode_error(message),
                        content_type="application/json", headers=headers)


def create_app(dataplane: DataPlane, config: ServerConfig) -> web.Application:
    middlewares = [json_errors] + ([_auth_middleware(config.token)] if config.token else [])
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[DATAPLANE] = dataplane
    app[CONFIG] = config
    app[BUDGET] = ByteBudget(config.body_budget_bytes)
    r = app.router
    bases = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
    for base in bases:  # first: the router tries same-prefix patterns in order, and infer is the hot one
        r.add_post(base + "/infer", infer)
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/health/live", health_live)
    r.add_get("/v2/health/ready", health_ready)
    r.add_get("/metrics", metrics)
    for base in bases:
        r.add_get(base, model_metadata)
        r.add_get(base + "/ready", model_ready)
    shm.install(app, config.shared_memory, owner_by_token=bool(config.token))  # [shm]
    r.add_route("*", "/{tail:.*}", not_found)
    return app


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    return ctx


class _JsonErrorsHandler(RequestHandler):
    """aiohttp's connection handler, answering requests its parser refused (a bad request line,
    headers over the caps) with JSON; installed on each handler the server makes (same layout)."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        response = _as_json_error(super().handle_error(request, status, exc, message))
        response.force_close()
        return response


class _Refusal(asyncio.Protocol):
    """The answer to a connection over `max_connections`: a 503 written at once, then closed."""

    def __init__(self, limit: int) -> None:
        body = protocol.encode_error(f"{limit} connections are open, the limit; retry later")
        self._reply = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                       b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self._reply)
        transport.close()


class _JsonErrorsSite(web.TCPSite):
    """A TCPSite whose connections start on the fast path (`agent.fast_http`, unless an access log is
    wanted: it logs aiohttp's requests only), answer parser errors in JSON and stop at `max_connections`."""

    def __init__(self, runner: web.BaseRunner, config: ServerConfig, ssl_context: ssl.SSLContext | None,
                 front: fast_http.FastFront | None) -> None:
        super().__init__(runner, config.host, config.port, ssl_context=ssl_context, backlog=512)
        self._max_connections = config.max_connections
        self.front = front
        self.refused_connections = 0

    def _aiohttp_handler(self) -> RequestHandler:
        server = self._runner.server
        assert server is not None
        handler = server()
        handler.__class__ = _JsonErrorsHandler
        return handler

    def _connection(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        front = self.front
        if len(server.connections) + (len(front.connections) if front else 0) >= self._max_connections:
            self.refused_connections += 1
            return _Refusal(self._max_connections)
        return front.connection() if front else self._aiohttp_handler()

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._connection, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


class HttpServer:
    """Start/stop the HTTP edge inside any running event loop (the daemon, `outpost serve`, tests)."""

    def __init__(self, dataplane: DataPlane, config: ServerConfig | None = None) -> None:
        self.dataplane = dataplane
        self.config = config or ServerConfig()
        self.app = create_app(dataplane, self.config)
        self._runner: web.AppRunner | None = None
        #: the fast path's connections (None with an access log); see agent.fast_http
        self.front: fast_http.FastFront | None = None
        self._collector: HttpEdgeCollector | None = None

    async def start(self) -> None:
        c = self.config
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=log if c.access_log else None,
            keepalive_timeout=c.keepalive_timeout_s, max_line_size=c.max_line_bytes,
            max_field_size=c.max_field_bytes, max_headers=c.max_headers, shutdown_timeout=c.drain_timeout_s,
        )
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        answer = _answer(self.app, c.token)
        server.request_handler = _fast_infer(server.request_handler, answer)
        site = _JsonErrorsSite(self._runner, c, ssl_context(c), None)
        if not c.access_log:
            site.front = fast_http.FastFront(
                answer, site._aiohttp_handler, keepalive_timeout_s=c.keepalive_timeout_s,
                max_line_bytes=c.max_line_bytes, max_field_bytes=c.max_field_bytes, max_headers=c.max_headers)
        self.front = site.front
        self._collector = HttpEdgeCollector(self.app[BUDGET], site.front, lambda: site.refused_connections)
        self.dataplane.metrics.registry.register(self._collector)
        await site.start()

    @property
    def port(self) -> int:
        assert self._runner is not None, "not started"
        return int(self._runner.addresses[0][1])

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{self.config.host}:{self.port}"

    async def stop(self) -> bool:
        """Graceful: not ready (503 for new requests), in-flight finish, then close. True if fully drained."""
        self.dataplane.begin_drain()
        drained = await self.dataplane.wait_idle(self.config.drain_timeout_s)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.front is not None:
            self.front.close_all()
        if self._collector is not None:
            self.dataplane.metrics.registry.unregister(self._collector)
            self._collector = None
        await self.dataplane.close()
        return drained
