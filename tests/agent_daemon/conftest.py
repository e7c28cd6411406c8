"""Bundles for the agent tests: one model name, several versions, packed as the fleet stores them."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import bundle
from tests.models.make_models import mlp


@dataclass(frozen=True)
class Version:
    ref: str
    version: str
    dir: pathlib.Path
    archive: pathlib.Path
    model: pathlib.Path

    def expect(self, x: np.ndarray) -> np.ndarray:
        s = ort.InferenceSession(str(self.model), providers=["CPUExecutionProvider"])
        return np.asarray(s.run(["logits"], {"input": x})[0])


def nan_mlp() -> onnx.ModelProto:
    """Valid ONNX that answers NaN to everything: it must fail the health gate."""
    model = mlp(seed=3)
    for init in model.graph.initializer:
        if init.name == "b2":
            init.CopyFrom(numpy_helper.from_array(np.full((10,), np.nan, np.float32), "b2"))
    return model


def make_version(root: pathlib.Path, key: pathlib.Path, name: str, version: str, model: onnx.ModelProto,
                 release: int = 1, **opts: object) -> Version:
    path = root / f"{name}-{version}.onnx"
    onnx.save_model(model, str(path))
    dest = root / f"{name}-{version}"
    bundle.build([path], dest, bundle.BuildOptions(name=name, version=version, release=release, max_batch_size=8,
                                                   max_queue_delay_ms=1.0, **opts))  # type: ignore[arg-type]
    bundle.sign_directory(dest, key)
    archive = bundle.pack(dest, root / f"{name}-{version}.tar")
    return Version(f"{name}@{version}", version, dest, archive, path)


@pytest.fixture(scope="session")
def versions(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[pathlib.Path, pathlib.Path]
             ) -> dict[str, Version]:
    root = tmp_path_factory.mktemp("agent-versions")
    key = keypair[0]
    return {
        "v1": make_version(root, key, "demo", "1.0.0", mlp(seed=1), release=2),
        "v2": make_version(root, key, "demo", "2.0.0", mlp(seed=2), release=2),
        "v3": make_version(root, key, "demo", "3.0.0", nan_mlp(), release=2),
        "old": make_version(root, key, "demo", "0.9.0", mlp(seed=9), release=1),
        "arm": make_version(root, key, "demo", "2.1.0", mlp(seed=4), release=2, architectures=("aarch64",)),
    }
