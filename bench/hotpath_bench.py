"""Outpost's own CPU per small request, below HTTP, beside a minimal wrapper's work in the same process.

    .venv/bin/python bench/hotpath_bench.py [--rounds 15] [--requests 600] [--profile json|binary|c64-queued]

For the tests' MLP ([1,64] -> 10 floats) it times, in microseconds per request:

- `protocol.decode_request` -> `DataPlane.infer` -> `protocol.encode_response(...).body()`, one
  request at a time (the c=1 path: the batcher runs the tiny engine inline), for the v2 JSON body
  and the v2 binary body: each step in a loop of its own, and the three together ("total");
- the same path with 64 coroutines in flight on one loop (`asyncio.gather`, repeated): the queued,
  batched path a server at concurrency 64 takes;
- what bench/serving/minimal_server.py does per request: `json.loads`, `np.asarray`, `session.run`,
  `json.dumps` of `tolist()` (and for a raw body `np.frombuffer`, `run`, `tobytes`).

No HTTP: the HTTP layer's cost is the same for both and is measured by bench/serving_bench.py.
Figures are process CPU time (`time.process_time`: engine threads included, time spent
preempted excluded), per request. Rounds interleave Outpost and the wrapper and the table shows
medians, so a busy neighbour shifts both alike. uvloop, as `outpost serve` runs. To compare two versions of agent/, run
this file with PYTHONPATH pointing at each (the repository root is only a fallback on sys.path).
`--profile` prints a cProfile of one path instead (own time, top functions).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pathlib
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import uvloop

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: another agent/ there wins

import bundle  # noqa: E402
from agent import protocol  # noqa: E402
from agent.config import ModelConfig  # noqa: E402
from agent.dataplane import DataPlane  # noqa: E402
from agent.runner import EngineSource  # noqa: E402
from engines import EngineOptions  # noqa: E402
from tests.models.make_models import mlp  # noqa: E402

CONCURRENCY = 64
#: CPU time of the whole process (engine and worker threads included), not wall time: on a machine
#: shared with other work, time spent preempted would otherwise count as ours
_cpu = time.process_time


def _bodies(x: np.ndarray) -> dict[str, tuple[bytes, int | None]]:
    """The bodies bench/serving/payloads.py writes for wrk: v2 JSON, v2 binary (+ header length), raw."""
    v2 = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return {"json": (json.dumps(v2).encode(), None), "binary": (header + x.astype("<f4").tobytes(), len(header)),
            "raw": (x.astype("<f4").tobytes(), None)}


class Bench:
    def __init__(self, work: pathlib.Path) -> None:
        path = work / "mlp.onnx"
        onnx.save_model(mlp(), str(path))
        dest = work / "bundle-mlp"
        bundle.build([path], dest, bundle.BuildOptions(name="mlp", version="1.0.0", max_batch_size=32,
                                                       max_queue_delay_ms=2.0))
        verified = bundle.load_unverified(dest)
        self.dp = DataPlane(engines=EngineSource(cache_dir=work / "engines"))
        self.dp.load_bundle(verified,  # what `outpost serve` configures by default
                            ModelConfig(inline_compute_ms=0.2, engine_options=EngineOptions(allow_spinning=False)))
        #: every batch through the queue and a worker thread (inline_compute_ms=0): the path of a
        #: model slower than the inline threshold, which the tiny MLP otherwise never takes
        self.dpq = DataPlane(engines=EngineSource(cache_dir=work / "engines"))
        self.dpq.load_bundle(verified,
                             ModelConfig(inline_compute_ms=0.0, engine_options=EngineOptions(allow_spinning=False)))
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        self.bodies = _bodies(np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32))

    # ------------------------------------------------------------------ Outpost, one at a time

    async def outpost_steps(self, kind: str, n: int) -> dict[str, float]:
        """us of CPU per request: each step in a loop of its own, then the three together."""
        body, hl = self.bodies[kind]
        dp, decode, encode = self.dp, protocol.decode_request, protocol.encode_response
        out: dict[str, float] = {}
        t0 = _cpu()
        for _ in range(n):
            req = decode(body, hl)
        out["decode"] = _cpu() - t0
        t0 = _cpu()
        for _ in range(n):
            resp = await dp.infer("mlp", None, req)
        out["infer"] = _cpu() - t0
        t0 = _cpu()
        for _ in range(n):
            encode(resp).body()
        out["encode"] = _cpu() - t0
        t0 = _cpu()
        for _ in range(n):
            encode(await dp.infer("mlp", None, decode(body, hl))).body()
        out["total"] = _cpu() - t0
        return {k: v * 1e6 / n for k, v in out.items()}

    @staticmethod
    async def _one(dp: DataPlane, body: bytes, hl: int | None) -> bytes:
        resp = await dp.infer("mlp", None, protocol.decode_request(body, hl))
        return protocol.encode_response(resp).body()

    async def outpost_concurrent(self, kind: str, n: int, concurrency: int = CONCURRENCY,
                                 queued: bool = False) -> float:
        """CPU us per request with `concurrency` requests in flight (waves of gather)."""
        body, hl = self.bodies[kind]
        dp = self.dpq if queued else self.dp
        waves = max(1, n // concurrency)
        t0 = _cpu()
        for _ in range(waves):
            await asyncio.gather(*[self._one(dp, body, hl) for _ in range(concurrency)])
        return (_cpu() - t0) * 1e6 / (waves * concurrency)

    # ------------------------------------------------------------------ the minimal wrapper

    def wrapper_json(self, n: int) -> float:
        body, _ = self.bodies["json"]
        session, name = self.session, "input"
        t0 = _cpu()
        for _ in range(n):
            doc = json.loads(body)
            t = doc["inputs"][0]
            x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
            out = session.run(None, {name: x})[0]
            json.dumps({"outputs": [{"name": "output", "shape": list(out.shape), "data": out.ravel().tolist()}]})
        return (_cpu() - t0) * 1e6 / n

    def wrapper_raw(self, n: int) -> float:
        body, _ = self.bodies["raw"]
        session, name = self.session, "input"
        t0 = _cpu()
        for _ in range(n):
            x = np.frombuffer(body, dtype=np.float32).reshape([-1, 64])
            session.run(None, {name: x})[0].tobytes()
        return (_cpu() - t0) * 1e6 / n


async def _measure(b: Bench, rounds: int, n: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    for kind in ("json", "binary"):  # warm-up: engine EWMA measured (inline path), caches hot
        await b.outpost_steps(kind, 200)
        await b.outpost_concurrent(kind, 256)
        await b.outpost_concurrent(kind, 256, queued=True)
    b.wrapper_json(200)
    b.wrapper_raw(200)
    for _ in range(rounds):
        for kind in ("json", "binary"):
            for step, us in (await b.outpost_steps(kind, n)).items():
                add(f"outpost {kind} c=1 {step}", us)
            add(f"outpost {kind} c={CONCURRENCY} (inline engine)", await b.outpost_concurrent(kind, n))
        add("outpost json c=1 queued (engine on a thread)", await b.outpost_concurrent("json", n // 2, 1, True))
        add(f"outpost json c={CONCURRENCY} queued (engine on a thread)",
            await b.outpost_concurrent("json", n, queued=True))
        add("wrapper json (loads, asarray, run, dumps)", b.wrapper_json(n))
        add("wrapper raw (frombuffer, run, tobytes)", b.wrapper_raw(n))
    return rows


def _table(rows: dict[str, list[float]]) -> str:
    lines = [f"{'path (CPU us per request)':<46} {'median':>8} {'min':>8} {'max':>8}"]
    for key, values in rows.items():
        lines.append(f"{key:<46} {statistics.median(values):>8.1f} {min(values):>8.1f} {max(values):>8.1f}")
    wj = statistics.median(rows["wrapper json (loads, asarray, run, dumps)"])
    oj = statistics.median(rows["outpost json c=1 total"])
    lines.append(f"outpost json c=1 / wrapper json: {oj / wj:.2f}x the CPU")
    return "\n".join(lines)


async def _profile(b: Bench, which: str, n: int) -> str:
    kind = "binary" if which == "binary" else "json"
    await b.outpost_steps(kind, 200)
    await b.outpost_concurrent(kind, 256, queued=True)
    run: Callable[[], Coroutine[Any, Any, Any]] = (
        (lambda: b.outpost_concurrent("json", n, queued=True)) if which == "c64-queued"
        else (lambda: b.outpost_steps(kind, n)))
    prof = cProfile.Profile()
    prof.enable()
    await run()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--requests", type=int, default=600, help="requests per path per round")
    ap.add_argument("--profile", choices=("json", "binary", "c64-queued"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="outpost-hotpath-") as tmp:
        b = Bench(pathlib.Path(tmp))

        async def go() -> None:
            try:
                if args.profile:
                    print(await _profile(b, args.profile, args.requests * 4))
                else:
                    print(f"agent from {protocol.__file__.rsplit('/', 2)[0]}; {args.rounds} rounds x "
                          f"{args.requests} requests per path")
                    print(_table(await _measure(b, args.rounds, args.requests)))
            finally:
                await b.dp.close()
                await b.dpq.close()

        uvloop.run(go())


if __name__ == "__main__":
    main()
