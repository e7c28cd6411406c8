"""Make the small, real ONNX models the tests and benchmarks run on.

Deterministic (fixed seeds), built with onnx.helper so no exporter is needed.
`python tests/models/make_models.py OUT_DIR` writes them all; tests call
`write_all` through a session fixture. Each model exists to exercise a case:

- mlp:            [batch,64] -> [batch,10]; the serving workhorse
- multi_io:       two inputs (float32 + int64), two outputs
- dynamic_conv:   [batch,3,height,width] conv net with dynamic spatial dims
- types:          int64 and bool inputs, int64 output
- fp16:           float16 in and out
- string_op:      a string op (CPU-only in ONNX Runtime; TensorRT rejects it)
- big:            an MLP with ~16 MB of weights (over 5 and 10 MB)
- cnn:            ~1 GFLOP per 224x224 image (benchmarks)
- unknown_op:     valid ONNX with an op of an unregistered domain: no runtime loads it
- external:       weights in an external-data file beside the .onnx
- malformed:      bytes that are not an ONNX protobuf
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="outpost-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _w(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(dtype), name)


def mlp(hidden: int = 128, in_dim: int = 64, out_dim: int = 10, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["h1r"]),
        helper.make_node("MatMul", ["h1r", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", out_dim])],
        [_w(rng, "w1", (in_dim, hidden)), _w(rng, "b1", (hidden,)), _w(rng, "w2", (hidden, out_dim)),
         _w(rng, "b2", (out_dim,))],
    )
    return _model(graph)


def multi_io() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["features", "w"], ["proj"]),
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["ids_f", "axes"], ["id_sum"], keepdims=1),
        helper.make_node("Add", ["proj", "id_sum"], ["scores"]),
        helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "multi_io",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
        [_w(rng, "w", (8, 3)), numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return _model(graph)


def dynamic_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["image", "k"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "dynamic_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 8])],
        [_w(rng, "k", (8, 3, 3, 3))],
    )
    return _model(graph)


def types() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Cast", ["mask"], ["mask_i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["tokens", "mask_i"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes"], ["total"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "types",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "seq"])],
        [helper.make_tensor_value_info("total", TensorProto.INT64, ["batch"])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return _model(graph)


def fp16() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Tanh", ["y0"], ["y"])]
    graph = helper.make_graph(
        nodes, "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 4])],
        [_w(rng, "w", (16, 4), np.float16)],
    )
    return _model(graph)


def string_op() -> onnx.ModelProto:
    nodes = [helper.make_node("StringNormalizer", ["text"], ["normalized"], case_change_action="LOWER", locale="C")]
    graph = helper.make_graph(
        nodes, "string_op",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("normalized", TensorProto.STRING, ["n"])],
    )
    return _model(graph)


def big() -> onnx.ModelProto:
    """~16.8 MB of float32 weights: over the 5 MB and 10 MB thresholds of the specs."""
    return mlp(hidden=2048 * 2, in_dim=1024, out_dim=16, seed=4)


def cnn() -> onnx.ModelProto:
    """About 1 GFLOP per 224x224 image: strided convs, then a classifier."""
    rng = np.random.default_rng(5)
    chans = [3, 40, 80, 160, 320]
    nodes, inits, prev = [], [], "image"
    for i in range(4):
        k, b = f"k{i}", f"kb{i}"
        inits += [_w(rng, k, (chans[i + 1], chans[i], 3, 3)), _w(rng, b, (chans[i + 1],))]
        nodes += [helper.make_node("Conv", [prev, k, b], [f"c{i}"], pads=[1, 1, 1, 1], strides=[2, 2] if i else [1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev = f"r{i}"
        if i == 0:
            inits += [_w(rng, "k0b", (40, 40, 3, 3)), _w(rng, "kb0b", (40,))]
            nodes += [helper.make_node("Conv", [prev, "k0b", "kb0b"], ["c0b"], pads=[1, 1, 1, 1], strides=[2, 2]),
                      helper.make_node("Relu", ["c0b"], ["r0b"])]
            prev = "r0b"
    inits += [_w(rng, "fc", (320, 1000)), _w(rng, "fcb", (1000,))]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
              helper.make_node("MatMul", ["flat", "fc"], ["fcm"]),
              helper.make_node("Add", ["fcm", "fcb"], ["logits"])]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        inits,
    )
    return _model(graph)


def unknown_op() -> onnx.ModelProto:
    """Valid ONNX (passes the checker and bundle validation) that no runtime can load: an op
    from a custom domain nobody registered. Exercises a build that fails in the child process."""
    nodes = [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.outpost.test")]
    graph = helper.make_graph(
        nodes, "unknown_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.outpost.test", 1)],
                              producer_name="outpost-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


MODELS = {"mlp": mlp, "multi_io": multi_io, "dynamic_conv": dynamic_conv, "types": types, "fp16": fp16,
          "string_op": string_op, "big": big, "cnn": cnn, "unknown_op": unknown_op}


def write_external(out_dir: pathlib.Path, location: str = "external.onnx.data") -> pathlib.Path:
    """The MLP with its weights stored in `location` (relative to the model)."""
    model = mlp(seed=6)
    path = out_dir / "external.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def write_all(out_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, make in MODELS.items():
        p = out / f"{name}.onnx"
        onnx.save_model(make(), str(p))
        paths[name] = p
    ext_dir = out / "external"
    ext_dir.mkdir(exist_ok=True)
    paths["external"] = write_external(ext_dir)
    bad = out / "malformed.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04this is not an onnx model \xff\xfe" * 8)
    paths["malformed"] = bad
    return paths


if __name__ == "__main__":
    for name, path in write_all(sys.argv[1] if len(sys.argv) > 1 else "models").items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")

