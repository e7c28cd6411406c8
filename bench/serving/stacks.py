"""One handler, several HTTP stacks: what the stack itself costs per request.

Every stack runs the same work per request: parse the v2 JSON body with orjson,
`np.asarray` the data, ONNX Runtime `run` inline (1 intra-op thread, no
spinning), answer with orjson. Only the HTTP server around it changes.

    python stacks.py STACK MODEL.onnx PORT       (granian is started by its own CLI; see http_stacks_bench.py)

Stacks: aiohttp-app (Application + router), aiohttp-lowlevel (`web.Server`),
uvicorn-httptools (raw ASGI app, httptools parser, uvloop), granian-rsgi (RSGI,
`rsgi_app` below, model from $BENCH_MODEL), aiohttp-reuseport-2 (two aiohttp
processes on one port with SO_REUSEPORT, a session each: the "second core" by processes).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson


class Work:
    """The handler's body, shared by every stack."""

    def __init__(self, model: str) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
        self.out_name = self.session.get_outputs()[0].name

    def infer(self, body: bytes) -> bytes:
        doc = orjson.loads(body)
        t = doc["inputs"][0]
        x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
        out = self.session.run(None, {t["name"]: x})[0]
        return orjson.dumps({"outputs": [{"name": self.out_name, "datatype": "FP32", "shape": list(out.shape),
                                          "data": out.ravel().tolist()}]})


JSON_HEADERS = [(b"content-type", b"application/json")]


def aiohttp_app(work: Work, port: int, reuse_port: bool = False) -> None:
    import uvloop
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        return web.Response(body=work.infer(await request.read()), content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/infer", infer)
    app.router.add_get("/ready", ready)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, reuse_port=reuse_port,
                loop=uvloop.new_event_loop())


def aiohttp_lowlevel(work: Work, port: int) -> None:
    import uvloop
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.Response:
        if request.path == "/infer":
            return web.Response(body=work.infer(await request.read()), content_type="application/json")
        return web.Response(text="ok")

    async def main() -> None:
        server = web.Server(handle, access_log=None)
        await asyncio.get_running_loop().create_server(server, "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def uvicorn_asgi(work: Work, port: int) -> None:
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/infer":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        chunks = []
        more = True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = work.infer(b"".join(chunks))
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="uvloop", access_log=False,
                log_level="warning", lifespan="off")


_rsgi_work: Work | None = None


async def rsgi_app(scope: Any, proto: Any) -> None:
    """Granian RSGI entry point (granian --interface rsgi serving.stacks:rsgi_app)."""
    global _rsgi_work
    if _rsgi_work is None:
        _rsgi_work = Work(os.environ["BENCH_MODEL"])
    if scope.path != "/infer":
        proto.response_bytes(200, [], b"ok")
        return
    body = await proto()
    proto.response_bytes(200, [("content-type", "application/json")], _rsgi_work.infer(body))


_CANNED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 228\r\n\r\n" + b" " * 228


class _Canned(asyncio.Protocol):
    """The floor: every request answered with a fixed 228-byte body, nothing parsed but the framing."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:].split(b"\r\n")[0]) if at >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(_CANNED)  # type: ignore[attr-defined]


def floor(work: Work, port: int) -> None:
    """What wrk and the kernel cost per request on this machine: no HTTP library, no work."""
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Canned, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def reuseport(model: str, port: int, n: int = 2) -> None:
    children = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            aiohttp_app(Work(model), port, reuse_port=True)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


def main() -> None:
    stack, model, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if stack == "aiohttp-reuseport-2":
        assert hasattr(socket, "SO_REUSEPORT")
        reuseport(model, port)
        return
    runners = {"aiohttp-app": aiohttp_app, "aiohttp-lowlevel": aiohttp_lowlevel, "uvicorn-httptools": uvicorn_asgi,
               "floor": floor}
    runners[stack](Work(model), port)


if __name__ == "__main__":
    main()
