"""The tensor signature `bundle build` reads from real exporters' quirks: unknown dims, ZipMap outputs,
the warning for dynamic dims without samples, and every read failure of `verify` typed."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import bundle
from bundle.errors import InvalidModel, UnreadableFile
from cli.main import cli
from tests.conftest import MakeBundle
from tests.models.quirks import zipmap


def _identity_model(inputs: list[list[int | str]], path: pathlib.Path) -> pathlib.Path:
    """One Identity per input; shapes written verbatim (dim_param strings, dim_value ints incl. -1)."""
    ins, outs, nodes = [], [], []
    for i, shape in enumerate(inputs):
        ins.append(helper.make_tensor_value_info(f"in{i}", TensorProto.FLOAT, shape))
        outs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, shape))
        nodes.append(helper.make_node("Identity", [f"in{i}"], [f"out{i}"]))
    model = helper.make_model(helper.make_graph(nodes, "g", ins, outs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def test_unknown_dims_are_independent_and_a_leading_unknown_is_the_batch(tmp_path: pathlib.Path) -> None:
    path = _identity_model([[-1, 3, "?", "?"], ["unk__12", "unk__13", "-1", ""], ["N", "height", "?", 4]],
                           tmp_path / "m.onnx")
    sig = bundle.read_signature(path)
    shapes = {t["name"]: t["shape"] for t in sig["inputs"] + sig["outputs"]}
    assert shapes["in0"] == ["batch", 3, "in0_dim2", "in0_dim3"]
    assert shapes["in1"] == ["batch", "in1_dim1", "in1_dim2", "in1_dim3"]
    assert shapes["in2"] == ["N", "height", "in2_dim2", 4]  # real names are kept, also when leading
    assert shapes["out0"] == ["batch", 3, "out0_dim2", "out0_dim3"]
    unknown = [d for s in shapes.values() for d in s[1:] if isinstance(d, str) and d not in ("height",)]
    assert len(unknown) == len(set(unknown))  # never a shared name


def test_a_model_naming_a_dim_batch_elsewhere_keeps_it_apart(tmp_path: pathlib.Path) -> None:
    sig = bundle.read_signature(_identity_model([["?", "batch"]], tmp_path / "m.onnx"))
    assert sig["inputs"][0]["shape"] == ["batch_", "batch"]


def test_outputs_leading_unknown_dim_takes_the_batch_name_the_inputs_give(tmp_path: pathlib.Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    sig = bundle.read_signature(tmp_path / "m.onnx")
    assert sig["inputs"][0]["shape"] == ["N", 4] and sig["outputs"][0]["shape"] == ["N", 4]


@pytest.mark.parametrize("string_labels", [False, True])
def test_a_zipmap_output_is_recorded_as_its_served_tensor(tmp_path: pathlib.Path, string_labels: bool) -> None:
    path = tmp_path / "clf.onnx"
    onnx.save_model(zipmap(string_labels), str(path))
    m = bundle.build([path], tmp_path / "b", bundle.BuildOptions(name="clf", version="1.0.0")).model()
    label, proba = m.outputs
    assert (label.dtype, label.shape, label.source) == ("string" if string_labels else "int64", ("batch",), None)
    assert proba.dtype == "float32" and proba.shape == ("batch", 3) and proba.source is not None
    want = ("setosa", "versicolor", "virginica") if string_labels else (0, 1, 2)
    kind = "string" if string_labels else "int64"
    assert (proba.source.kind, proba.source.onnx_type, proba.source.labels) == (
        "zipmap", f"seq(map({kind},tensor(float)))", want)
    again = bundle.load_manifest(tmp_path / "b")  # through the JSON schema and back
    assert again.model().outputs == m.outputs
    plain = json.loads((tmp_path / "b" / "outpost.json").read_text())["models"][0]["inputs"][0]
    assert "source" not in plain  # plain tensors keep their schema-1 form


def test_other_non_tensor_outputs_are_refused_with_their_type(tmp_path: pathlib.Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["seq"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(tmp_path / "s.onnx"))
    with pytest.raises(InvalidModel, match=r"'seq' is a seq\(tensor\(float\)\), not a tensor"):
        bundle.read_signature(tmp_path / "s.onnx")


def test_build_warns_about_dynamic_dims_without_samples(tmp_path: pathlib.Path,
                                                        model_paths: dict[str, pathlib.Path]) -> None:
    runner = CliRunner()
    for model, warned in (("dynamic_conv", True), ("mlp", False)):
        out = tmp_path / model
        res = runner.invoke(cli, ["bundle", "build", str(model_paths[model]), "--out", str(out),
                                  "--name", model, "--version", "1.0.0"])
        assert res.exit_code == 0, res.output
        assert ("dynamic dims" in res.output and "--samples" in res.output) is warned, res.output
    samples = tmp_path / "s.npz"
    np.savez(samples, image=np.zeros((1, 3, 32, 32), np.float32))
    res = runner.invoke(cli, ["bundle", "build", str(model_paths["dynamic_conv"]), "--out", str(tmp_path / "s"),
                              "--name", "c", "--version", "1.0.0", "--samples", str(samples)])
    assert res.exit_code == 0 and "dynamic dims" not in res.output, res.output


def test_an_os_refusal_during_verify_is_a_typed_bundle_error(make_bundle: MakeBundle,
                                                            trust: list[bundle.TrustAnchor]) -> None:
    """A path past PATH_MAX fails lstat with ENAMETOOLONG even for root: a raw OSError escaped before."""
    root = make_bundle("mlp")
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(20):  # 20 x 250 characters: deeper than PATH_MAX (4096)
            os.mkdir("d" * 250, dir_fd=fd)
            nxt = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    for load in (lambda: bundle.verify(root, trust), lambda: bundle.load_unverified(root)):
        with pytest.raises(UnreadableFile, match="cannot read the bundle"):
            load()
