"""Build an (unsigned) bundle directory from ONNX files.

The tensor signature is read from the graph itself, so the manifest can never
drift from the model: names, dtypes and shapes, with dynamic dimensions kept
by name (an unnamed dynamic dimension gets a generated name, so that engines
can build optimisation profiles from it). The model must pass onnx's checker.
The bundle is assembled in a staging directory beside `out` and renamed into
place only when complete.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import manifest as mf
from .errors import BundleError, InvalidModel, ManifestError
from .fsutil import atomic_write_bytes, copy_file_atomic, staged_directory
from .hashing import sha256_file
from .manifest import MANIFEST_NAME, EngineKind, Precision
from .onnx_refs import ProtobufError, external_refs
from .served import ServedForm, describe_type, served_forms

_DTYPES = {
    "FLOAT": "float32",
    "FLOAT16": "float16",
    "DOUBLE": "float64",
    "BFLOAT16": "bfloat16",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "BOOL": "bool",
    "STRING": "string",
}


@dataclass(frozen=True)
class BuildOptions:
    name: str
    version: str
    release: int = 1
    owner: str = ""
    description: str = ""
    slo_p95_ms: float | None = None
    slo_max_error_rate: float = 0.01
    slo_max_nan_rate: float | None = None
    #: Custom metrics the rollout gates read: ({"name": ..., "min"/"max": ...}, ...).
    metrics: tuple[dict[str, Any], ...] = ()
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    engines: tuple[EngineKind, ...] = mf.DEFAULT_ENGINES
    precision: Precision = "fp32"
    min_compute_capability: str | None = None
    architectures: tuple[str, ...] = ("x86_64", "aarch64")
    samples: pathlib.Path | None = None
    assets: tuple[pathlib.Path, ...] = field(default_factory=tuple)


#: dim_param values exporters write for "unknown": empty, "?" (PaddlePaddle), "-1", "None", and
#: placeholders such as tf2onnx's "unk__12"; each is its own dimension, never a shared name
_UNKNOWN_DIM = re.compile(r"^\s*(\?|-1|None|unk__\d+|)\s*$")
#: the name a leading unknown dimension gets: exporters write "-1"/"?"/"" for the batch
BATCH_DIM = "batch"


def _dim_name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", raw)[:64]
    return name if re.match(r"^[A-Za-z_]", name) else f"d_{name}"[:64]


def is_unknown_dim(dim: Any) -> bool:
    """An ONNX dimension with neither a size nor a meaningful name (-1 counts: PaddlePaddle writes it)."""
    if dim.HasField("dim_value"):
        return bool(dim.dim_value <= 0)
    return bool(_UNKNOWN_DIM.match(dim.dim_param))


class _DimNamer:
    """Names the dims of one model: real names kept, unknown ones made independent.

    A leading unknown dim is the batch (exporters write -1/"?"/"" there): every
    such dim shares one name, so batching merges requests on it. Any other
    unknown dim gets a name of its own, so two of them never have to agree.
    """

    def __init__(self, graph: Any) -> None:
        named = {d.dim_param for v in (*graph.input, *graph.output) if v.type.HasField("tensor_type")
                 for d in v.type.tensor_type.shape.dim if d.dim_param and not is_unknown_dim(d)}
        self._taken = {_dim_name(n) for n in named}
        initializers = {i.name for i in graph.initializer}
        leading = {_dim_name(d[0].dim_param) if d and d[0].dim_param and not is_unknown_dim(d[0]) else None
                   for v in graph.input if v.name not in initializers and v.type.HasField("tensor_type")
                   for d in [v.type.tensor_type.shape.dim]}
        if len(leading) == 1 and None not in leading:  # the inputs name their batch: outputs' unknown one is it
            self.batch = str(leading.pop())
            return
        self.batch = BATCH_DIM
        while self.batch in self._taken:
            self.batch += "_"

    def name(self, dim: Any, tensor: str, axis: int) -> int | str:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            return int(dim.dim_value)
        if not is_unknown_dim(dim):
            return _dim_name(dim.dim_param)
        if axis == 0:
            return self.batch
        base = _dim_name(f"{tensor}_dim{axis}")
        name, i = base, 2
        while name in self._taken:
            name, i = f"{base}_{i}"[:64], i + 1
        self._taken.add(name)
        return name


def _tensor_spec(value_info: Any, path: str, namer: _DimNamer, served: ServedForm | None = None) -> dict[str, Any]:
    import onnx

    ttype = value_info.type
    if served is not None:
        return served.spec(value_info.name, namer.batch)
    if not ttype.HasField("tensor_type"):
        raise InvalidModel(path, f"input/output {value_info.name!r} is a {describe_type(ttype)}, not a tensor; "
                                 "Outpost serves tensors, and a sklearn classifier's ZipMap output")
    elem = onnx.TensorProto.DataType.Name(ttype.tensor_type.elem_type)
    if elem not in _DTYPES:
        raise InvalidModel(path, f"tensor {value_info.name!r} has unsupported dtype {elem}")
    if not ttype.tensor_type.HasField("shape"):
        raise InvalidModel(path, f"tensor {value_info.name!r} has no declared shape (rank unknown)")
    shape = [namer.name(d, value_info.name, i) for i, d in enumerate(ttype.tensor_type.shape.dim)]
    return {"name": value_info.name, "dtype": _DTYPES[elem], "shape": shape}


def read_signature(model_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check an ONNX model and return its inputs, outputs and opset."""
    import onnx

    path = os.fspath(model_path)
    try:
        onnx.checker.check_model(path, full_check=False)
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # onnx raises ValidationError, DecodeError, ValueError...
        raise InvalidModel(path, f"not a valid ONNX model: {str(e).strip().splitlines()[0][:300]}") from None
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    namer = _DimNamer(graph)
    served = served_forms(graph)
    inputs = [_tensor_spec(v, path, namer) for v in graph.input if v.name not in initializers]
    outputs = [_tensor_spec(v, path, namer, served.get(v.name)) for v in graph.output]
    if not inputs or not outputs:
        raise InvalidModel(path, "the graph needs at least one input and one output")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"inputs": inputs, "outputs": outputs, "opset": opset}


def sample_warnings(manifest: mf.Manifest) -> list[str]:
    """Why a bundle without samples may go unchecked on the device: dims other than the batch
    that engines can only guess (an STFT needs a minimum length, a detector a stride multiple)."""
    if manifest.samples:
        return []
    out = []
    for m in manifest.models:
        guessed = sorted({d for t in m.inputs for d in t.shape[1:] if isinstance(d, str)})
        if guessed:
            out.append(f"model {m.name} has dynamic dims {', '.join(guessed)} and no sample inputs: devices will "
                       "synthesize inputs for the parity check, which some models reject; add `--samples`")
    return out


def _model_name(path: pathlib.Path, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9._-]", "-", path.stem.lower()).strip("-._") or "model"
    name, i = base[:60], 2
    while name in taken:
        name, i = f"{base[:56]}-{i}", i + 1
    return name


def _copy_model(src: pathlib.Path, staging: pathlib.Path, dest_rel: str) -> list[str]:
    """Copy the model and its external-data files; return every file written."""
    try:
        refs = external_refs(src)
    except ProtobufError as e:
        raise InvalidModel(str(src), f"not a parseable ONNX protobuf: {e}") from None
    written = [dest_rel]
    (staging / dest_rel).parent.mkdir(parents=True, exist_ok=True)
    copy_file_atomic(src, staging / dest_rel)
    src_dir = src.parent.resolve()
    for loc in sorted({r.location for r in refs}):
        data_src = (src_dir / loc).resolve()
        if pathlib.PurePosixPath(loc).is_absolute() or src_dir not in data_src.parents:
            raise InvalidModel(str(src), f"external data {loc!r} is outside the model's directory")
        rel = (pathlib.PurePosixPath(dest_rel).parent / loc).as_posix()
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        copy_file_atomic(data_src, staging / rel)
        written.append(rel)
    return written


def _check_samples(path: pathlib.Path, inputs: Sequence[dict[str, Any]]) -> None:
    import numpy as np

    names = {i["name"] for i in inputs}
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
    except Exception as e:
        raise ManifestError(str(path), f"samples must be a numpy .npz archive: {e}") from None
    if not keys or not keys <= names:
        raise ManifestError(str(path), f"sample arrays {sorted(keys)} must be named after model inputs {sorted(names)}")


def build(
    models: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    opts: BuildOptions,
    *,
    overwrite: bool = False,
) -> mf.Manifest:
    """Assemble a bundle directory at `out` from ONNX files; returns its manifest."""
    if not models:
        raise BundleError(os.fspath(out), "at least one model is needed")
    out_path = pathlib.Path(out).absolute()
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise BundleError(str(out_path), "output directory exists and is not empty (use --force to replace it)")
    with staged_directory(out_path) as staging:
        entries, taken, seen_files = [], set[str](), set[str]()
        for m in models:
            src = pathlib.Path(m)
            if not src.is_file():
                raise InvalidModel(str(src), "no such model file")
            sig = read_signature(src)
            name = _model_name(src, taken)
            taken.add(name)
            rel = f"models/{name}.onnx"
            written = _copy_model(src, staging, rel)
            if seen_files & set(written):
                raise InvalidModel(str(src), "two models share an external-data file name")
            seen_files.update(written)
            digest, size = sha256_file(staging / rel)
            entries.append(
                {
                    "name": name,
                    "file": rel,
                    "format": "onnx",
                    "sha256": digest,
                    "size": size,
                    "opset": sig["opset"],
                    "inputs": sig["inputs"],
                    "outputs": sig["outputs"],
                }
            )
        samples_rel = None
        if opts.samples is not None:
            _check_samples(opts.samples, entries[0]["inputs"])
            samples_rel = "samples.npz"
            copy_file_atomic(opts.samples, staging / samples_rel)
        assets = []
        for a in opts.assets:
            rel = f"assets/{a.name}"
            (staging / "assets").mkdir(exist_ok=True)
            copy_file_atomic(a, staging / rel)
            assets.append(rel)
        doc: dict[str, Any] = {
            "schema_version": mf.SCHEMA_VERSION,
            "name": opts.name,
            "version": opts.version,
            "release": opts.release,
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "models": [{k: v for k, v in e.items() if v is not None} for e in entries],
            "samples": samples_rel,
            "assets": assets,
            "serving": {
                "batching": {"max_batch_size": opts.max_batch_size, "max_queue_delay_ms": opts.max_queue_delay_ms},
                "engines": list(opts.engines),
                "precision": opts.precision,
            },
            "constraints": {
                "architectures": list(opts.architectures),
                "min_compute_capability": opts.min_compute_capability,
            },
            "service": {
                "owner": opts.owner,
                "description": opts.description,
                "slo": {"p95_latency_ms": opts.slo_p95_ms, "max_error_rate": opts.slo_max_error_rate,
                        **({"max_nan_rate": opts.slo_max_nan_rate} if opts.slo_max_nan_rate is not None else {})},
                **({"metrics": [dict(m) for m in opts.metrics]} if opts.metrics else {}),
            },
        }
        manifest = mf.from_dict(doc, MANIFEST_NAME)
        atomic_write_bytes(staging / MANIFEST_NAME, manifest.to_json())
    return manifest
