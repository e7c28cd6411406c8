"""ONNX values that are not tensors but are served as one, and how the manifest records them.

skl2onnx converts a scikit-learn classifier with a ZipMap node by default:
its probabilities come out as `seq(map(int64|string, tensor(float)))`, one
{class label: probability} map per row. That is the most common way tabular
models reach ONNX, so Outpost serves such an output as an FP32 `[batch,
classes]` tensor whose columns follow the ZipMap's own label order, and the
manifest keeps the ONNX type and the labels (`TensorSpec.source`) so the
device knows how to convert and clients can read the column labels.

Each kind of conversion is one entry of `_KINDS`; a graph output that is not a
tensor and matches none is refused at build time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_ML_DOMAIN = "ai.onnx.ml"


def describe_type(ttype: Any) -> str:
    """An ONNX TypeProto as ONNX Runtime spells it: `tensor(float)`, `seq(map(int64,tensor(float)))`."""
    import onnx

    which = ttype.WhichOneof("value")
    if which == "tensor_type":
        return f"tensor({onnx.TensorProto.DataType.Name(ttype.tensor_type.elem_type).lower()})"
    if which == "sequence_type":
        return f"seq({describe_type(ttype.sequence_type.elem_type)})"
    if which == "map_type":
        key = onnx.TensorProto.DataType.Name(ttype.map_type.key_type).lower()
        return f"map({key},{describe_type(ttype.map_type.value_type)})"
    if which == "optional_type":
        return f"optional({describe_type(ttype.optional_type.elem_type)})"
    return which or "unknown"


@dataclass(frozen=True)
class ServedForm:
    """How one non-tensor graph output is served: its ONNX type, the conversion and the labels."""

    kind: str
    onnx_type: str
    labels: tuple[int | str, ...]

    def spec(self, name: str, batch: str) -> dict[str, Any]:
        """The manifest tensor entry: the served tensor, with `source` saying what it is made from."""
        return {"name": name, "dtype": "float32", "shape": [batch, len(self.labels)],
                "source": {"kind": self.kind, "onnx_type": self.onnx_type, "labels": list(self.labels)}}


def _zipmap(node: Any, ttype: str) -> ServedForm | None:
    if ttype not in ("seq(map(int64,tensor(float)))", "seq(map(string,tensor(float)))"):
        return None
    attrs = {a.name: a for a in node.attribute}
    labels: tuple[int | str, ...]
    if "classlabels_int64s" in attrs:
        labels = tuple(int(v) for v in attrs["classlabels_int64s"].ints)
    elif "classlabels_strings" in attrs:
        labels = tuple(v.decode() for v in attrs["classlabels_strings"].strings)
    else:
        return None
    return ServedForm("zipmap", ttype, labels) if labels else None


#: (domain, op type) of the node producing a non-tensor output -> its served form, or None if unsupported
_KINDS: dict[tuple[str, str], Callable[[Any, str], ServedForm | None]] = {
    (_ML_DOMAIN, "ZipMap"): _zipmap,
}


def served_forms(graph: Any) -> dict[str, ServedForm]:
    """Graph output name -> served form, for every non-tensor output Outpost knows how to serve."""
    producers = {out: node for node in graph.node for out in node.output}
    forms: dict[str, ServedForm] = {}
    for value in graph.output:
        if value.type.HasField("tensor_type") or value.name not in producers:
            continue
        node = producers[value.name]
        convert = _KINDS.get((node.domain, node.op_type))
        form = convert(node, describe_type(value.type)) if convert else None
        if form is not None:
            forms[value.name] = form
    return forms
