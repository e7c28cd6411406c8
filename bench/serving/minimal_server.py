"""What teams write first: an aiohttp app that calls `session.run` per request, nothing else.

No validation, no batching, no metrics, no queue bound. JSON bodies are parsed
with the standard library (as such code usually does) from the same v2 JSON the
other servers get; an `application/octet-stream` body is taken as the raw
little-endian float32 tensor and answered with the raw output bytes.

    python minimal_server.py MODEL.onnx PORT
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
from aiohttp import web


def main() -> None:
    model, port = sys.argv[1], int(sys.argv[2])
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    tail_shape = [d for d in inp.shape[1:]]

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        if request.content_type == "application/octet-stream":
            x = np.frombuffer(body, dtype=np.float32).reshape([-1, *tail_shape])
            out = session.run(None, {inp.name: x})[0]
            return web.Response(body=out.tobytes(), content_type="application/octet-stream")
        doc = json.loads(body)
        t = doc["inputs"][0]
        x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
        out = session.run(None, {inp.name: x})[0]
        return web.json_response({"outputs": [{"name": "output", "shape": list(out.shape),
                                               "data": out.ravel().tolist()}]})

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/infer", infer)
    app.router.add_get("/ready", ready)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
