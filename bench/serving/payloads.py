"""The request bodies, written once to files for wrk: the same tensor in each server's format."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Payload:
    path: pathlib.Path
    content_type: str
    header_length: int | None = None


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


def make(out: pathlib.Path, name: str, input_name: str, x: np.ndarray) -> dict[str, Payload]:
    """Keys: v2-json, v2-binary (outpost), raw (minimal wrapper's binary), bento-json."""
    flat = x.ravel().tolist()
    v2 = {"inputs": [{"name": input_name, "datatype": "FP32", "shape": list(x.shape), "data": flat}]}
    header = json.dumps({"inputs": [{"name": input_name, "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return {
        "v2-json": Payload(_write(out / f"{name}.v2.json", json.dumps(v2).encode()), "application/json"),
        "v2-binary": Payload(_write(out / f"{name}.v2.bin", header + x.astype("<f4").tobytes()),
                             "application/octet-stream", len(header)),
        "raw": Payload(_write(out / f"{name}.raw", x.astype("<f4").tobytes()), "application/octet-stream"),
        "bento-json": Payload(_write(out / f"{name}.bento.json", json.dumps({"x": x.tolist()}).encode()),
                              "application/json"),
    }
