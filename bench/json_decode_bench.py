"""JSON tensors into numpy and back: the candidate parsers side by side, in one process.

Decode: one 224x224x3 image's v2 JSON body (150,528 float32 numbers, ~1.6 MB) into a
float32 array of its shape, each candidate doing the work the agent needs (find the
input's `data`, every element a number, count checked). `agent` is the agent's own
`protocol.decode_request`, everything included. Encode: a response with the numbers
written straight from numpy vs through `tolist()`.

Each figure is the median of --runs timings after a warm-up, candidates interleaved
round by round so that a noisy neighbour hits them alike.

Big bodies (--big): a 60 MB body (37 images) decoded in pieces vs whole, with the longest
time a 1 ms ticker thread was kept from running (the GIL held in one C call): what an
event loop serving health probes would wait.

    python bench/json_decode_bench.py [--runs 30] [--big 5] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from agent import json_tensors, protocol
from agent.protocol import InferResponse, OutputTensor

SHAPE = (1, 3, 224, 224)


def _image_body() -> bytes:
    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    return orjson.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(SHAPE),
                                     "data": x.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY)


def _check(arr: np.ndarray) -> np.ndarray:
    if arr.size != math.prod(SHAPE) or arr.dtype.kind not in "fiu":
        raise ValueError("wrong count or kind")
    return arr.astype(np.float32, copy=False).reshape(SHAPE)


def decoders() -> dict[str, Callable[[bytes], np.ndarray] | None]:
    """name -> decode(body); None where the package is not installed."""
    out: dict[str, Callable[[bytes], np.ndarray] | None] = {}
    out["agent (simdjson as_buffer, all checks)"] = lambda b: protocol.decode_request(b).inputs[0].data
    out["orjson + np.asarray (the agent before)"] = lambda b: _check(np.asarray(orjson.loads(b)["inputs"][0]["data"]))
    if importlib.util.find_spec("simdjson"):
        import simdjson
        parser = simdjson.Parser()

        def simd(b: bytes) -> np.ndarray:
            doc: Any = parser.parse(b)
            arr = np.frombuffer(doc["inputs"][0]["data"].as_buffer(of_type="d"))
            del doc
            return _check(arr)
        out["pysimdjson as_buffer (bare)"] = simd
    else:
        out["pysimdjson as_buffer (bare)"] = None
    if importlib.util.find_spec("msgspec"):
        import msgspec

        # built at run time: the module's postponed annotations cannot name local classes
        item = msgspec.defstruct("Input", [("name", str), ("datatype", str), ("shape", list[int]),
                                           ("data", list[float])])
        dec: Any = msgspec.json.Decoder(msgspec.defstruct("Request", [("inputs", list[item])]))  # type: ignore[valid-type]
        out["msgspec typed (list[float]) + np.asarray"] = lambda b: _check(np.asarray(dec.decode(b).inputs[0].data))
    else:
        out["msgspec typed (list[float]) + np.asarray"] = None
    if importlib.util.find_spec("rapidjson"):
        import rapidjson
        out["python-rapidjson + np.asarray"] = lambda b: _check(np.asarray(rapidjson.loads(b)["inputs"][0]["data"]))
    else:
        out["python-rapidjson + np.asarray"] = None
    return out


def encoders() -> dict[str, Callable[[np.ndarray], bytes]]:
    def agent(a: np.ndarray) -> bytes:
        return protocol.encode_response(InferResponse("m", "1", (OutputTensor("y", a),))).header

    def via_tolist(a: np.ndarray) -> bytes:
        data = [x if math.isfinite(x) else ("NaN" if x != x else ("Infinity" if x > 0 else "-Infinity"))
                for x in a.ravel().tolist()]
        return orjson.dumps({"model_name": "m", "model_version": "1", "outputs": [
            {"name": "y", "datatype": "FP32", "shape": list(a.shape), "data": data}]})
    return {"agent (orjson from numpy)": agent, "tolist() + orjson": via_tolist}


def _with_nan(n: int, values: list[float]) -> np.ndarray:
    a = np.random.default_rng(3).random(n).astype(np.float32)
    a[::10] = np.resize(np.array(values, np.float32), a[::10].size)
    return a


def _median_ms(fn: Callable[[Any], Any], arg: Any, rounds: list[float]) -> None:
    t = time.perf_counter()
    fn(arg)
    rounds.append((time.perf_counter() - t) * 1000)


def run(runs: int) -> dict[str, Any]:
    body = _image_body()
    reference = protocol.decode_request(body).inputs[0].data
    decs = {k: v for k, v in decoders().items() if v is not None}
    for name, fn in decs.items():  # every candidate decodes the same numbers
        np.testing.assert_array_equal(fn(body), reference, err_msg=name)
    outputs = {
        "image-sized output (150,528 FP32)": np.random.default_rng(1).random(150_528, dtype=np.float32),
        "classifier output (1,000 FP32)": np.random.default_rng(2).random(1000, dtype=np.float32),
        "1,000 FP32, every 10th NaN": _with_nan(1000, [np.nan]),
        "1,000 FP32, every 10th NaN/Inf/-Inf": _with_nan(1000, [np.nan, np.inf, -np.inf]),
        "150,528 FP32, every 10th NaN/Inf/-Inf": _with_nan(150_528, [np.nan, np.inf, -np.inf]),
    }
    timings: dict[str, list[float]] = {name: [] for name in decs}
    enc_timings: dict[tuple[str, str], list[float]] = {(o, e): [] for o in outputs for e in encoders()}
    for r in range(runs + 3):
        for name, fn in decs.items():
            _median_ms(fn, body, timings[name] if r >= 3 else [])
        for oname, arr in outputs.items():
            for ename, efn in encoders().items():
                _median_ms(efn, arr, enc_timings[(oname, ename)] if r >= 3 else [])
    return {
        "body_bytes": len(body),
        "decode_ms": {name: statistics.median(t) for name, t in timings.items()},
        "missing": [k for k, v in decoders().items() if v is None],
        "encode_ms": {f"{o} | {e}": statistics.median(t) for (o, e), t in enc_timings.items()},
    }


def big_body(runs: int) -> dict[str, dict[str, float]]:
    """Decode time and the longest stall of a ticker thread, pieces vs whole, median over runs."""
    x = np.random.default_rng(0).random((37, 3, 224, 224), dtype=np.float32)
    body = orjson.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                                     "data": x.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY)
    out: dict[str, dict[str, list[float]]] = {"in pieces (the agent)": {"ms": [], "stall_ms": []},
                                               "whole": {"ms": [], "stall_ms": []}}
    split = json_tensors.SPLIT_BYTES
    for _ in range(runs):
        for name in out:
            json_tensors.SPLIT_BYTES = split if name.startswith("in pieces") else len(body) + 1
            gaps: list[float] = []
            stop = threading.Event()

            def tick(gaps: list[float] = gaps, stop: threading.Event = stop) -> None:
                last = time.perf_counter()
                while not stop.is_set():
                    time.sleep(0.001)
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now
            t = threading.Thread(target=tick)
            t.start()
            time.sleep(0.02)
            t0 = time.perf_counter()
            req = protocol.decode_request(body)
            out[name]["ms"].append((time.perf_counter() - t0) * 1000)
            stop.set()
            t.join()
            out[name]["stall_ms"].append(max(gaps) * 1000)
            np.testing.assert_array_equal(req.inputs[0].data, x)
            del req
    json_tensors.SPLIT_BYTES = split
    return {name: {k: statistics.median(v) for k, v in d.items()} | {"body_mb": len(body) / 1e6}
            for name, d in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--big", type=int, default=5, help="runs of the 60 MB body (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.runs)
    if args.big:
        res["big_body"] = big_body(args.big)
    if args.json:
        json.dump(res, sys.stdout, indent=2)
        return
    base = res["decode_ms"]["orjson + np.asarray (the agent before)"]
    print(f"decode one {SHAPE} FP32 body ({res['body_bytes']:,} bytes) into numpy, median of {args.runs}:")
    print("| decoder | ms | vs orjson + np.asarray |\n|---|---|---|")
    for name, ms in sorted(res["decode_ms"].items(), key=lambda kv: kv[1]):
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")
    for name in res["missing"]:
        print(f"| {name} | not installed | |")
    print("\nencode a response, median ms:\n| output | encoder | ms |\n|---|---|---|")
    for key, ms in res["encode_ms"].items():
        o, e = key.split(" | ")
        print(f"| {o} | {e} | {ms:.3f} |")
    if args.big:
        print(f"\n60 MB body, median of {args.big}:")
        print("| decode | ms | longest stall of a ticker thread, ms |\n|---|---|---|")
        for name, d in res["big_body"].items():
            print(f"| {name} | {d['ms']:.0f} | {d['stall_ms']:.1f} |")


if __name__ == "__main__":
    main()
