"""The bundle manifest, `outpost.json`, as immutable typed objects.

The JSON Schema (`outpost.schema.json`, beside this module) is the contract; the
dataclasses here are what code reads after the schema has accepted a document,
so no consumer ever indexes raw dicts. Parsing is bounded: a hostile manifest
(huge, deeply nested, absurd numbers) is refused before anything trusts it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Literal, cast

import jsonschema
from jsonschema import Draft202012Validator

from .errors import ManifestError, ManifestSchemaError

MANIFEST_NAME = "outpost.json"
SIGNATURE_NAME = "model.sig"
SCHEMA_VERSION = 1
#: A manifest is a few KiB; anything near this is hostile or broken.
MAX_MANIFEST_BYTES = 1 << 20

Dim = int | str
Precision = Literal["fp32", "fp16"]
EngineKind = Literal["tensorrt", "cuda", "cpu"]
DEFAULT_ENGINES: tuple[EngineKind, ...] = ("tensorrt", "cuda", "cpu")


@dataclass(frozen=True)
class TensorSource:
    """What a served tensor is made from when the ONNX value is not a tensor (see `bundle.served`)."""

    kind: Literal["zipmap"]
    #: the ONNX type, as ONNX Runtime spells it, e.g. "seq(map(int64,tensor(float)))"
    onnx_type: str
    #: class labels, in the order of the served tensor's last axis
    labels: tuple[int | str, ...]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    #: An int is a fixed size; a str names a dynamic dimension.
    shape: tuple[Dim, ...]
    #: None for a plain tensor; else the non-tensor ONNX value this tensor is served from
    source: TensorSource | None = None

    @property
    def dynamic_dims(self) -> tuple[str, ...]:
        return tuple(d for d in self.shape if isinstance(d, str))


@dataclass(frozen=True)
class ModelEntry:
    name: str
    file: str
    sha256: str
    size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    format: Literal["onnx"] = "onnx"
    opset: int | None = None


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0


@dataclass(frozen=True)
class Serving:
    batching: Batching = field(default_factory=Batching)
    engines: tuple[EngineKind, ...] = DEFAULT_ENGINES
    precision: Precision = "fp32"


@dataclass(frozen=True)
class Constraints:
    architectures: tuple[str, ...] = ("x86_64", "aarch64")
    #: e.g. "7.5"; None when any GPU (or none) will do.
    min_compute_capability: str | None = None


@dataclass(frozen=True)
class Slo:
    p95_latency_ms: float | None = None
    max_error_rate: float = 0.01
    #: Share of requests allowed to produce NaN/Inf outputs; None leaves it to the fleet's default.
    max_nan_rate: float | None = None


@dataclass(frozen=True)
class CustomMetric:
    """A metric the model's users count (agents report it per window); rollouts gate on its bounds."""

    name: str
    description: str = ""
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Service:
    owner: str = ""
    description: str = ""
    slo: Slo = field(default_factory=Slo)
    metrics: tuple[CustomMetric, ...] = ()


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    release: int
    created: str
    models: tuple[ModelEntry, ...]
    serving: Serving = field(default_factory=Serving)
    constraints: Constraints = field(default_factory=Constraints)
    service: Service = field(default_factory=Service)
    samples: str | None = None
    assets: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    @property
    def ref(self) -> str:
        """`name@version`, the form assignments and the CLI use."""
        return f"{self.name}@{self.version}"

    def model(self, name: str | None = None) -> ModelEntry:
        if name is None:
            return self.models[0]
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def declared_files(self) -> tuple[str, ...]:
        """Every file the manifest itself names (models, samples, assets)."""
        files = [m.file for m in self.models]
        if self.samples:
            files.append(self.samples)
        files.extend(self.assets)
        return tuple(files)

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        for m in raw["models"]:
            for t in (*m["inputs"], *m["outputs"]):
                if t["source"] is None:  # plain tensors keep the schema-1 form
                    del t["source"]
        # Optional fields left unset are left out, so manifests that do not use them keep their bytes.
        if not raw["service"]["metrics"]:
            del raw["service"]["metrics"]
        else:
            raw["service"]["metrics"] = [{k: v for k, v in m.items() if v is not None}
                                         for m in raw["service"]["metrics"]]
        if raw["service"]["slo"]["max_nan_rate"] is None:
            del raw["service"]["slo"]["max_nan_rate"]
        return cast(dict[str, Any], json.loads(json.dumps(raw)))  # tuples -> lists

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def _validator() -> Draft202012Validator:
    global _VALIDATOR
    if _VALIDATOR is None:
        text = resources.files(__package__).joinpath("outpost.schema.json").read_text()
        schema = json.loads(text)
        Draft202012Validator.check_schema(schema)
        _VALIDATOR = Draft202012Validator(schema)
    return _VALIDATOR


_VALIDATOR: Draft202012Validator | None = None


def schema() -> dict[str, Any]:
    """The JSON Schema document (for docs and `outpost bundle schema`)."""
    return cast(dict[str, Any], _validator().schema)


def _field_path(err: jsonschema.ValidationError) -> str:
    parts = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
    return "$" + parts


def validate(doc: object, path: str = MANIFEST_NAME) -> None:
    """Raise `ManifestSchemaError` naming the first offending field (deepest first)."""
    errors = sorted(_validator().iter_errors(doc), key=lambda e: (-len(e.absolute_path), e.message))
    if errors:
        err = errors[0]
        message = err.message if len(err.message) <= 300 else err.message[:300] + "..."
        raise ManifestSchemaError(path, _field_path(err), message)


def tensor_spec(d: dict[str, Any]) -> TensorSpec:
    """A TensorSpec from its (already validated) dict form; also reads `dataclasses.asdict`'s output."""
    src = d.get("source")
    source = None if src is None else TensorSource(src["kind"], src["onnx_type"], tuple(src["labels"]))
    return TensorSpec(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]), source=source)


def from_dict(doc: dict[str, Any], path: str = MANIFEST_NAME) -> Manifest:
    """Build a Manifest from a document, validating it against the schema first."""
    validate(doc, path)
    models = tuple(
        ModelEntry(
            name=m["name"],
            file=m["file"],
            sha256=m["sha256"],
            size=m["size"],
            inputs=tuple(tensor_spec(t) for t in m["inputs"]),
            outputs=tuple(tensor_spec(t) for t in m["outputs"]),
            format=m["format"],
            opset=m.get("opset"),
        )
        for m in doc["models"]
    )
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ManifestSchemaError(path, "$.models", "model names must be unique")
    files = [m.file for m in models] + list(doc.get("assets", []))
    if doc.get("samples"):
        files.append(doc["samples"])
    if MANIFEST_NAME in files or SIGNATURE_NAME in files:
        raise ManifestSchemaError(
            path, "$.models", "a model or asset cannot be named like the manifest or the signature"
        )
    if len(set(files)) != len(files):
        raise ManifestSchemaError(path, "$.models", "each file may be listed once")
    for m in models:
        for io in (m.inputs, m.outputs):
            tnames = [t.name for t in io]
            if len(set(tnames)) != len(tnames):
                raise ManifestSchemaError(path, f"$.models[{m.name}]", "tensor names must be unique")
    sv, b, c, s = doc["serving"], doc["serving"]["batching"], doc["constraints"], doc["service"]
    return Manifest(
        name=doc["name"],
        version=doc["version"],
        release=doc["release"],
        created=doc["created"],
        models=models,
        serving=Serving(
            batching=Batching(b["max_batch_size"], float(b["max_queue_delay_ms"])),
            engines=tuple(sv["engines"]),
            precision=sv["precision"],
        ),
        constraints=Constraints(tuple(c["architectures"]), c.get("min_compute_capability")),
        service=_service(s),
        samples=doc.get("samples"),
        assets=tuple(doc.get("assets", [])),
        schema_version=doc["schema_version"],
    )


def _service(s: dict[str, Any]) -> Service:
    slo = Slo(s["slo"]["p95_latency_ms"], s["slo"]["max_error_rate"], s["slo"].get("max_nan_rate"))
    metrics = tuple(CustomMetric(m["name"], m.get("description", ""), m.get("min"), m.get("max"))
                    for m in s.get("metrics", []))
    return Service(s["owner"], s["description"], slo, metrics)


def parse(data: bytes, path: str = MANIFEST_NAME) -> Manifest:
    """Parse manifest bytes; bounded in size and depth."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(path, f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise ManifestError(path, "manifest JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(path, f"not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestSchemaError(path, "$", "the manifest must be a JSON object")
    return from_dict(doc, path)


def read_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """Read at most `limit` bytes; a larger file is refused, never read whole."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ManifestError(os.fspath(path), f"file is larger than the {limit}-byte limit")
    return data


def read_raw(bundle_dir: str | os.PathLike[str]) -> tuple[str, bytes]:
    """(path, bytes) of a bundle's manifest, bounded; for loaders that also hash it."""
    p = os.path.join(bundle_dir, MANIFEST_NAME)
    try:
        return p, read_bounded(p, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ManifestError(p, "no manifest: not an Outpost bundle directory") from None


def load(bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Read a bundle's manifest *without* verifying the bundle (build, inspect)."""
    path, data = read_raw(bundle_dir)
    return parse(data, path)
