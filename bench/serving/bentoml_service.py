"""BentoML 1.4 serving the same ONNX model with its adaptive batching.

Run by the benchmark with `bentoml serve bentoml_service:Onnx` from its own
virtual environment (bench/.venv-bentoml); the model path and batching knobs
come from the environment. Requests are JSON `{"x": [[...]]}` (a batch of rows).
"""

from __future__ import annotations

import os

import bentoml
import numpy as np

MODEL = os.environ["BENCH_MODEL"]
MAX_BATCH = int(os.environ.get("BENCH_MAX_BATCH", "32"))
MAX_LATENCY_MS = int(os.environ.get("BENCH_MAX_LATENCY_MS", "1000"))


@bentoml.service(workers=1, traffic={"timeout": 60})
class Onnx:
    def __init__(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(MODEL, sess_options=so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x.astype(np.float32)})[0]
