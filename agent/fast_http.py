"""Inference connections on httptools: the hot path for small requests, everything else to aiohttp.

Why: with a small model a request's own work is tens of microseconds, and aiohttp's
per-request machinery (a Request with its multidicts, a StreamReader, a StreamWriter, a
Response whose headers are built and serialised one by one, a task per connection loop
step) cost as much again (bench/README.md, "HTTP stacks and the hot path": uvicorn's
httptools protocol spent 17 us less per request than aiohttp's low-level server).

How, without a second HTTP implementation: every connection starts here. A request is
served here only when it is the common case in full: its header block and its whole body
(Content-Length, at most `SMALL_BODY_BYTES`) are already in the buffer, it is a plain
`POST /v2/models/{m}[/versions/{v}]/infer`, with no Transfer-Encoding, Content-Encoding,
Expect or Upgrade, within the header caps, and llhttp (httptools, the parser aiohttp
uses too) parsed it and agrees where it ends. The first request on a connection that is
anything else (another route, a parser error, a body still arriving, a big body) hands
the connection, from that request's first byte, to aiohttp's `RequestHandler` for the rest
of its life; aiohttp parses those bytes afresh and answers them as it answers every other
route (JSON errors, 413, 100-continue, streamed bodies, body timeouts, the byte budget's
waits). So the unusual keeps one implementation, and requests are answered in order.

What this keeps of the server's contract: the bearer token (`http_server.infer_or_500`),
the byte budget, keep-alive with the idle timeout, `Connection: close` and HTTP/1.0,
pipelined requests answered in order, a client that disconnects cancels its request,
write back-pressure (a client that does not read stops being served until it does), the
connection cap (counted with aiohttp's), and drain on stop.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, cast

import httptools

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

    from .admission import Reservation
    from .config import ServerConfig
    from .http_server import Incoming, Reply

log = logging.getLogger(__name__)

#: a body up to this size (the JSON decoded on the loop anyway, `agent.decoding`) may be served here
SMALL_BODY_BYTES = 64 << 10
#: the plain inference paths (both dispatchers'); a query or a percent-escape goes to aiohttp's router,
#: which decodes them
INFER_PATH = r"/v2/models/([^/%?]+)(?:/versions/([^/%?]+))?/infer"
_INFER_PATH = re.compile(INFER_PATH.encode())
#: headers that send a request to aiohttp whatever their value
_HAND_OFF = frozenset({b"transfer-encoding", b"content-encoding", b"expect", b"upgrade"})
#: the headers inference reads (`http_server._infer`); a duplicate of one goes to aiohttp
_KEPT = frozenset({b"content-length", b"content-type", b"authorization", b"outpost-timeout-ms",
                   b"inference-header-content-length"})
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


#: how long a request may stay incomplete here before aiohttp (and its body timeout) takes the connection
PARTIAL_GRACE_S = 1.0


class _Wait:
    """`_take`'s answer for a head request that may be for here and is not all in yet."""


_WAIT = _Wait()


class _HandOff(Exception):
    """This request is not for the fast path (raised from a parser callback, which stops llhttp)."""


class Request:
    """One small inference request, whole: what `http_server._infer` reads (its `Incoming`)."""

    __slots__ = ("body", "content_length", "headers")

    def __init__(self, headers: dict[str, str], body: bytes | bytearray) -> None:
        self.headers = headers  # lower-case names
        self.content_length: int | None = len(body)
        self.body = body

    async def read_body(self, config: ServerConfig, held: Reservation, deadline: float) -> bytes | bytearray:
        await held.admit(len(self.body), config.body_budget_wait_s, deadline)
        return self.body


#: (request, model, version or None, path) -> the answer; `http_server` provides it
Answer = Callable[["Incoming", str, "str | None", str], Awaitable["Reply"]]


class _Head:
    """llhttp's callbacks for the request at the head of a connection's buffer; reset per request."""

    __slots__ = ("_field_cap", "_line_cap", "_max_fields", "complete", "fields", "headers", "headers_done", "http10",
                 "keep_alive", "parser", "url")

    def __init__(self, line_cap: int, field_cap: int, max_fields: int) -> None:
        self._line_cap, self._field_cap, self._max_fields = line_cap, field_cap, max_fields
        self.parser: httptools.HttpRequestParser | None = None
        self.reset()

    def reset(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.fields = self._max_fields
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.http10 = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self._line_cap:
            raise _HandOff  # aiohttp answers the cap

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields -= 1
        if self.fields < 0 or len(name) + len(value) > self._field_cap:
            raise _HandOff
        key = name.lower()
        if key in _KEPT:
            text = key.decode("latin-1")
            if text in self.headers:
                raise _HandOff
            self.headers[text] = value.decode("latin-1")
        elif key in _HAND_OFF:
            raise _HandOff

    def on_headers_complete(self) -> None:
        self.headers_done = True
        # asked now: llhttp resets these flags once the message completes
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()
        self.http10 = self.parser.get_http_version() == "1.0"

    def on_message_complete(self) -> None:
        self.complete = True


class _DateHeader:
    """`Date:` as RFC 9110 asks of an origin server with a clock; formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


async def _resumed(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Go on with a coroutine that ran eagerly up to its first wait (what Python 3.12's eager tasks do)."""
    await _Resume(coro, waiting)


class _Resume:
    """Hands the task each future the coroutine waits on, and sends it on (or throws into it) as a task would."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro, self.waiting = coro, waiting

    def __await__(self) -> Generator[Any, None, None]:
        coro, waiting = self.coro, self.waiting
        while True:
            try:
                yield waiting
            except BaseException as e:  # the task's cancellation, thrown in at the wait
                try:
                    waiting = coro.throw(e)
                except StopIteration:
                    return
            else:
                try:
                    waiting = coro.send(None)
                except StopIteration:
                    return


class FastFront:
    """Shared by a site's connections: what they answer with, and which of them are open here."""

    def __init__(self, answer: Answer, aiohttp_handler: Callable[[], RequestHandler], *,
                 keepalive_timeout_s: float, max_line_bytes: int, max_field_bytes: int, max_headers: int) -> None:
        self.answer = answer
        self.aiohttp_handler = aiohttp_handler
        self.keepalive_timeout_s = keepalive_timeout_s
        self.line_cap = max_line_bytes
        self.field_cap = max_field_bytes
        self.max_headers = max_headers
        self.header_cap = max_line_bytes + max_headers * (max_field_bytes + 4)
        self.connections: set[InferConnection] = set()
        self.date = _DateHeader()
        #: requests served here, and connections handed to aiohttp (tests and benchmarks read them)
        self.served = 0
        self.handed_off = 0

    def connection(self) -> InferConnection:
        return InferConnection(self)

    def close_all(self) -> None:
        """On stop, after the data plane drained: close what is still open here."""
        for c in list(self.connections):
            c.close()


class InferConnection(asyncio.Protocol):
    """One client connection while it sends plain inference requests; see the module docstring."""

    def __init__(self, front: FastFront) -> None:
        self._front = front
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._task: asyncio.Task[None] | None = None
        #: a request of this connection is being answered (eagerly, or by `_task`)
        self._busy = False
        self._head = _Head(front.line_cap, front.field_cap, front.max_headers)
        self._parser = self._head.parser = httptools.HttpRequestParser(self._head)
        self._last_active = 0.0
        self._keepalive: asyncio.TimerHandle | None = None
        #: the head request's header block was taken: (its end, body length, model, version)
        self._pending: tuple[int, int, str, str | None] | None = None
        #: set while the head request is incomplete: at `PARTIAL_GRACE_S` it goes to aiohttp
        self._partial: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._gone = False

    # asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._front.connections.add(self)
        self._last_active = self._loop.time()
        self._arm_keepalive(self._last_active)

    def data_received(self, data: bytes) -> None:
        self._last_active = self._loop.time()
        self._buf += data
        if not self._busy and not self._writing_paused:
            self._next()
        elif len(self._buf) > self._front.header_cap + SMALL_BODY_BYTES and not self._reading_paused:
            self._reading_paused = True  # pipelined past what one request may be: wait for our answers
            assert self._transport is not None
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close our side too; answers already written are flushed first

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self._front.connections.discard(self)
        for timer in (self._keepalive, self._partial):
            if timer is not None:
                timer.cancel()
        if self._task is not None:
            self._task.cancel()  # its queued request is dropped, as aiohttp's handler_cancellation does

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._next()

    # requests ------------------------------------------------------------------------

    def _next(self) -> None:
        """Serve the requests at the head of the buffer in order, or hand the connection to aiohttp.

        Each one starts at once, inside this callback: a small model's request usually finishes
        without ever waiting (decoded, run inline, answered), and then costs no task and no trip
        round the event loop. One that does wait goes on as a task, and the next request starts
        when it is answered.
        """
        while self._buf and not self._busy and not self._gone and not self._writing_paused:
            taken = self._take()
            if taken is None:
                self._hand_off()
                return
            if isinstance(taken, _Wait):
                if self._partial is None:
                    self._partial = self._loop.call_later(PARTIAL_GRACE_S, self._partial_due)
                if self._reading_paused:  # its rest must be let in, however much is buffered
                    self._reading_paused = False
                    assert self._transport is not None
                    self._transport.resume_reading()
                return
            if self._partial is not None:
                self._partial.cancel()
                self._partial = None
            request, model, version, keep_alive = taken
            self._front.served += 1
            self._busy = True
            coro = self._serve(request, model, version, keep_alive)
            try:
                waiting = coro.send(None)
            except StopIteration:
                continue
            except BaseException:
                log.exception("inference connection failed")
                self.close()
                return
            self._task = self._loop.create_task(_resumed(coro, waiting))
            self._task.add_done_callback(self._task_done)
        if self._reading_paused and len(self._buf) <= self._front.header_cap and not self._gone:
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("inference connection failed", exc_info=task.exception())
            self.close()
        self._next()

    def _take(self) -> tuple[Request, str, str | None, bool | bytes] | _Wait | None:
        """Cut the head request off the buffer when it is one for here, whole.

        `_WAIT`: it may be, and is not all here yet. None: it is not (or llhttp says it is
        malformed): the buffer is left as it came, for aiohttp. The keep-alive answer is False,
        True, or the `Connection: keep-alive` line an HTTP/1.0 client needs to hear back.
        """
        buf, head, parser = self._buf, self._head, self._parser
        view = memoryview(buf)
        try:
            if self._pending is None:
                end = buf.find(b"\r\n\r\n", 0, self._front.header_cap)
                if end < 0:
                    return _WAIT if len(buf) < self._front.header_cap else None
                header_end = end + 4
                parser.feed_data(view[:header_end])
                if not head.headers_done or head.complete or parser.get_method() != b"POST":
                    return None
                match = _INFER_PATH.fullmatch(head.url)
                raw_length = head.headers.get("content-length")
                if (match is None or raw_length is None or not raw_length.isascii() or not raw_length.isdigit()
                        or len(raw_length) > 9 or int(raw_length) > SMALL_BODY_BYTES):
                    return None  # big bodies go to aiohttp, which streams them under the budget and a timeout
                self._pending = (header_end, int(raw_length), match[1].decode("latin-1"),
                                 match[2].decode("latin-1") if match[2] is not None else None)
            header_end, length, model, version = self._pending
            message_end = header_end + length
            if message_end > len(buf):
                return _WAIT
            if length:
                parser.feed_data(view[header_end:message_end])
            if not head.complete:
                return None  # llhttp and this framing disagree: never guess
        except (_HandOff, httptools.HttpParserError):
            return None
        finally:
            view.release()
        keep_alive: bool | bytes = head.keep_alive
        if keep_alive and head.http10:
            keep_alive = b"Connection: keep-alive\r\n"
        request = Request(head.headers, buf[header_end:message_end])
        if message_end == len(buf):
            buf.clear()
        else:
            del buf[:message_end]
        self._pending = None
        head.reset()
        return request, model, version, keep_alive

    async def _serve(self, request: Request, model: str, version: str | None, keep_alive: bool | bytes) -> None:
        path = (f"/v2/models/{model}/infer" if version is None else f"/v2/models/{model}/versions/{version}/infer")
        try:
            reply = await self._front.answer(request, model, version, path)
        finally:
            self._busy = False
        if self._gone:
            return
        keep = bool(keep_alive) and not reply.close
        self._write(reply, keep_alive if keep else False)
        if not keep:
            self.close()

    def _write(self, reply: Reply, keep_alive: bool | bytes) -> None:
        assert self._transport is not None
        extra = b""
        if reply.headers:
            extra = b"".join(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
                             for k, v in reply.headers.items())
        if keep_alive is False:
            extra += b"Connection: close\r\n"
        elif keep_alive is not True:
            extra += keep_alive
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n%s\r\n"
                % (reply.status, _REASONS.get(reply.status, b""), reply.content_type.encode(), len(reply.body),
                   self._front.date.get(), extra))
        if len(reply.body) < 16384:
            self._transport.write(head + reply.body)
        else:
            self._transport.writelines((head, reply.body))

    # the rest --------------------------------------------------------------------------

    def _hand_off(self) -> None:
        """From the head request on, this connection is aiohttp's."""
        transport = self._transport
        assert transport is not None and not self._busy
        self._front.handed_off += 1
        self._gone = True  # nothing here touches the connection again
        self._front.connections.discard(self)
        for timer in (self._keepalive, self._partial):
            if timer is not None:
                timer.cancel()
        self._keepalive = self._partial = None
        handler = self._front.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._reading_paused:
            transport.resume_reading()
        data, self._buf = bytes(self._buf), bytearray()
        handler.data_received(data)

    def _partial_due(self) -> None:
        """A request still incomplete after the grace: aiohttp's timeouts take it from here."""
        self._partial = None
        if not self._busy and not self._gone and self._buf:
            self._hand_off()

    def _arm_keepalive(self, since: float) -> None:
        timeout = self._front.keepalive_timeout_s
        if timeout > 0:
            self._keepalive = self._loop.call_at(since + timeout, self._keepalive_due)

    def _keepalive_due(self) -> None:
        """Once per timeout, not per request: re-armed while the client is active or a request runs."""
        self._keepalive = None
        if self._gone:
            return
        now = self._loop.time()
        if self._busy:
            self._arm_keepalive(now)
        elif now - self._last_active < self._front.keepalive_timeout_s:
            self._arm_keepalive(self._last_active)
        else:
            self.close()

    def close(self) -> None:
        if self._transport is not None and not self._gone:
            self._gone = True
            self._front.connections.discard(self)
            self._transport.close()
