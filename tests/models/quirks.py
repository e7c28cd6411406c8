"""A zoo of real-world model quirks: each model here failed to serve once, so each stays served.

Made like `make_models.py` (fixed seeds, onnx.helper, or the converter users
really use), small enough to build in milliseconds. `write_quirks(out_dir)`
writes them all; add a maker and a line to `QUIRKS` when a new kind of model
turns up:

- stft:     an audio front end with reflect padding of 200 samples on each
            side (like torch.stft(center=True) with n_fft=400): ONNX Runtime
            rejects any input of 200 samples or fewer, so the engines' usual
            synthesized length (32) fails inside the model
- stft_long: the same with 1200 samples of padding: longer than any length
            the engines synthesize within the default dim range (1024), so
            its parity can only be checked with `--samples`
- unknown:  PaddlePaddle-style `[-1, 3, "?", "?"]` input and `[-1, 5]` output;
            the two "?" are independent, the leading -1 is the batch
- zipmap:   a scikit-learn LogisticRegression converted by skl2onnx with its
            default options: int64 label + ZipMap `seq(map(int64, float))`
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
#: reflect padding on each side of the stft models' input: inputs must be longer
STFT_PAD = 200
STFT_LONG_PAD = 1200


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="outpost-quirks")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def stft(pad: int = STFT_PAD) -> onnx.ModelProto:
    """[batch, samples] -> [batch, 8, frames]: reflect pad, then 8 filters of 400 taps, hop 160, magnitudes."""
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Pad", ["audio", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Unsqueeze", ["padded", "axis1"], ["mono"]),
        helper.make_node("Conv", ["mono", "filters"], ["bands"], strides=[160]),
        helper.make_node("Abs", ["bands"], ["magnitude"]),
    ]
    graph = helper.make_graph(
        nodes, "stft",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"])],
        [helper.make_tensor_value_info("magnitude", TensorProto.FLOAT, ["batch", 8, "frames"])],
        [numpy_helper.from_array(np.array([0, pad, 0, pad], np.int64), "pads"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1"),
         numpy_helper.from_array((rng.standard_normal((8, 1, 400)) * 0.05).astype(np.float32), "filters")],
    )
    return _model(graph)


def unknown() -> onnx.ModelProto:
    """[-1, 3, ?, ?] image -> [-1, 5] scores: global average pool, then a linear layer."""
    rng = np.random.default_rng(12)
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes, "unknown_dims",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [-1, 5])],
        [numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "w")],
    )
    return _model(graph)


def zipmap(string_labels: bool = False) -> onnx.ModelProto:
    """skl2onnx's default conversion of a 3-class LogisticRegression on iris (4 float features)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    labels = np.array(["setosa", "versicolor", "virginica"])[y] if string_labels else y
    clf = LogisticRegression(max_iter=500).fit(x, labels)
    model = to_onnx(clf, x[:1].astype(np.float32), target_opset={"": OPSET, "ai.onnx.ml": 3})
    assert isinstance(model, onnx.ModelProto)
    return model


def iris_rows(n: int = 5) -> np.ndarray:
    from sklearn.datasets import load_iris

    x, _ = load_iris(return_X_y=True)
    return np.ascontiguousarray(x[::30][:n], dtype=np.float32)


QUIRKS: dict[str, Callable[[], onnx.ModelProto]] = {
    "stft": stft, "stft_long": lambda: stft(STFT_LONG_PAD), "unknown": unknown, "zipmap": zipmap,
}


def write_quirks(out_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, make in QUIRKS.items():
        path = out / f"{name}.onnx"
        onnx.save_model(make(), str(path))
        paths[name] = path
    return paths
