"""The sample model `outpost up` serves: a small deterministic MLP, [batch,64] -> [batch,10].

Built with onnx.helper (no exporter, no test code at run time); the same
graph as the test zoo's `mlp` so the figures and the demo agree.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IN_DIM, HIDDEN, OUT_DIM = 64, 128, 10


def sample_mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h1"]), helper.make_node("Add", ["h1", "b1"], ["h1b"]),
             helper.make_node("Relu", ["h1b"], ["h1r"]), helper.make_node("MatMul", ["h1r", "w2"], ["h2"]),
             helper.make_node("Add", ["h2", "b2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "sample_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", IN_DIM])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", OUT_DIM])],
        [w("w1", IN_DIM, HIDDEN), w("b1", HIDDEN), w("w2", HIDDEN, OUT_DIM), w("b2", OUT_DIM)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="outpost-up")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
