"""The limit: a bare ONNX Runtime loop, in its own process (same session options as the servers).

    python bare_ort.py MODEL.onnx SECONDS BATCH [BATCH...]
        -> JSON {"items_per_s": {batch: ...}, "cpu_ms_per_item": {batch: ...}}
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    model, seconds, batches = sys.argv[1], float(sys.argv[2]), [int(b) for b in sys.argv[3:]]
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    tail = [d for d in inp.shape[1:]]
    out: dict[str, dict[int, float]] = {"items_per_s": {}, "cpu_ms_per_item": {}}
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *tail)).astype(np.float32)
        sess.run(None, {inp.name: x})
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while (elapsed := time.perf_counter() - t0) < seconds or n < 3:
            sess.run(None, {inp.name: x})
            n += 1
        out["items_per_s"][b] = n * b / elapsed
        out["cpu_ms_per_item"][b] = (time.process_time() - c0) * 1000 / (n * b)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
