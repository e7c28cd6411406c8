"""A model that takes a while per request, for the drain tests: a Loop of `iterations` small MatMul+Tanh steps.

Its cost is mostly per-iteration overhead, so a batch of 50 takes about as long as a batch of 1, and one
request keeps the engine busy long enough for 49 more to queue behind it.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def slow_model(path: pathlib.Path, iterations: int, dim: int = 16) -> pathlib.Path:
    w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((dim, dim)) * 0.1).astype(np.float32), "w")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_in", "w"], ["xw"]), helper.make_node("Tanh", ["xw"], ["x_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["batch", dim])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "input"], ["output"], body=body)],
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", dim])],
        [numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trips"), w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="outpost-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
