"""Serve non-tensor model outputs as the tensors the manifest describes (see `bundle.served`).

ONNX Runtime hands a ZipMap output back as a list of {label: probability}
dicts; the served form is FP32 `[rows, labels]` with columns in the
manifest's label order. Only the ORT backends can produce such values (the
GPU backends refuse these models up front), and the parity reference goes
through the same conversion, so a served answer and the reference are
compared as the tensors clients receive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from bundle import TensorSource, TensorSpec

Converter = Callable[[Any], np.ndarray]


def _zipmap(source: TensorSource, value: Any) -> np.ndarray:
    rows: Sequence[Mapping[Any, float]] = value if isinstance(value, list) else list(value)
    out = np.empty((len(rows), len(source.labels)), dtype=np.float32)
    for i, row in enumerate(rows):
        try:
            out[i] = [row[label] for label in source.labels]
        except KeyError as e:
            raise ValueError(f"ZipMap row {i} has no probability for class {e.args[0]!r}") from None
    return out


_KINDS: dict[str, Callable[[TensorSource, Any], np.ndarray]] = {"zipmap": _zipmap}


def converters(specs: Iterable[TensorSpec]) -> dict[str, Converter]:
    """Output name -> conversion, for the outputs whose spec has a non-tensor `source`."""
    return {s.name: partial(_KINDS[s.source.kind], s.source) for s in specs if s.source is not None}


def as_tensors(values: Mapping[str, Any], convert: Mapping[str, Converter]) -> dict[str, np.ndarray]:
    return {name: convert[name](v) if name in convert else v for name, v in values.items()}
