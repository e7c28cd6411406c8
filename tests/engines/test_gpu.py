"""The GPU backends on a real NVIDIA GPU (run by bench/gpu_check.sh; skipped elsewhere: "needs an NVIDIA GPU")."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import bundle
from engines import InferenceError, SystemProbe, open_engine
from engines.parity import compare, reference_outputs
from tests.conftest import MakeBundle

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["tensorrt", "ort-tensorrt", "ort-cuda"]


def _reference(b: bundle.VerifiedBundle, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return reference_outputs(str(b.model_path()), feeds)


def test_probe_sees_the_gpu_and_its_runtimes() -> None:
    hw = SystemProbe().detect()
    assert hw.gpu is not None and hw.gpu.cc_tuple >= (5, 0)
    assert hw.gpu.memory_total_bytes > 0
    assert hw.driver_version and hw.cuda_version
    assert hw.tensorrt_version and "CUDAExecutionProvider" in hw.ort_providers


def test_auto_picks_native_tensorrt(make_bundle: MakeBundle, cache_dir: pathlib.Path) -> None:
    b = bundle.load_unverified(make_bundle("mlp", sign=False))
    result = open_engine(b, cache_dir=cache_dir)
    result.engine.close()
    assert result.backend == "tensorrt", result.fallbacks
    assert result.fallbacks == []


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("model", ["mlp", "dynamic_conv", "multi_io"])
def test_gpu_backend_builds_passes_parity_and_hits_the_cache(backend: str, model: str, make_bundle: MakeBundle,
                                                             cache_dir: pathlib.Path) -> None:
    b = bundle.load_unverified(make_bundle(model, sign=False))
    result = open_engine(b, backend=backend, cache_dir=cache_dir)
    with result.engine as engine:
        assert result.backend == backend and not result.cache_hit
        assert result.build is not None and result.build["parity"]["precision"] == "fp32"
        from engines import plan
        from engines.bench import feeds_for_batch

        profile = plan(b, backend=backend, cache_dir=cache_dir).profile
        for batch in (1, 32):
            feeds = feeds_for_batch(engine.inputs, profile, batch)
            compare(engine.infer(feeds), _reference(b, feeds), "fp32", backend)
    again = open_engine(b, backend=backend, cache_dir=cache_dir)
    again.engine.close()
    assert again.cache_hit


def test_tensorrt_fp16_bundle_passes_the_fp16_tolerance(make_bundle: MakeBundle, cache_dir: pathlib.Path) -> None:
    b = bundle.load_unverified(make_bundle("mlp", sign=False, precision="fp16"))
    result = open_engine(b, backend="tensorrt", cache_dir=cache_dir)
    result.engine.close()
    assert result.build is not None and result.build["parity"]["precision"] == "fp16"


def test_tensorrt_parser_rejection_is_the_fallback_reason(make_bundle: MakeBundle, cache_dir: pathlib.Path) -> None:
    b = bundle.load_unverified(make_bundle("string_op", sign=False))
    result = open_engine(b, cache_dir=cache_dir)
    result.engine.close()
    assert result.backend == "ort-cpu"
    first = result.fallbacks[0]
    assert first.backend == "tensorrt" and first.kind == "build-failed"
    assert "ONNX parser rejected the model" in first.reason


def test_batch_beyond_the_profile_is_an_inference_error(make_bundle: MakeBundle, cache_dir: pathlib.Path) -> None:
    b = bundle.load_unverified(make_bundle("mlp", sign=False, max_batch_size=8))
    result = open_engine(b, backend="tensorrt", cache_dir=cache_dir)
    with result.engine as engine, pytest.raises(InferenceError):
        engine.infer({"input": np.ones((9, 64), np.float32)})
