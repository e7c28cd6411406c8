"""open_engine end to end on real ONNX Runtime sessions: every model kind, samples, fallbacks, failures."""

from __future__ import annotations

import dataclasses
import pathlib
import threading
from types import MappingProxyType

import numpy as np
import onnxruntime as ort
import pytest

import bundle
from engines import (
    BackendUnavailable,
    EngineOptions,
    InferenceError,
    StaticProbe,
    SystemProbe,
    open_engine,
)
from engines.parity import generate_inputs
from tests.conftest import MakeBundle


def _bare(model_path: pathlib.Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds), strict=True))


@pytest.mark.parametrize("model", ["mlp", "multi_io", "dynamic_conv", "types", "fp16", "string_op", "external"])
def test_each_model_kind_builds_checks_and_matches_bare_ort(model: str, make_bundle: MakeBundle,
                                                             cpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    b = bundle.load_unverified(make_bundle(model, sign=False))
    result = open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    with result.engine as engine:
        assert result.backend == "ort-cpu" and not result.cache_hit
        assert result.build is not None and result.build["parity"]["source"] == "generated"
        assert [f.backend for f in result.fallbacks] == ["tensorrt", "ort-tensorrt", "ort-cuda"]
        assert {f.kind for f in result.fallbacks} == {"no-gpu"}
        feeds = generate_inputs(engine.inputs, _profile(b, cpu_probe, cache_dir), seed=7)
        got, want = engine.infer(feeds), _bare(b.model_path(), feeds)
        assert got.keys() == want.keys()
        for name in want:
            if want[name].dtype.kind in "fc":
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(got[name], want[name])
    again = open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    again.engine.close()
    assert again.cache_hit and again.build is None


def _profile(b: bundle.VerifiedBundle, probe: StaticProbe, cache_dir: pathlib.Path):  # type: ignore[no-untyped-def]
    from engines import plan

    return plan(b, cache_dir=cache_dir, probe=probe).profile


def test_signed_bundle_samples_drive_the_parity_check(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor],
                                                      tmp_path: pathlib.Path, cpu_probe: StaticProbe,
                                                      cache_dir: pathlib.Path) -> None:
    samples = tmp_path / "samples.npz"
    np.savez(samples, input=np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(3, 64))
    b = bundle.verify(make_bundle("mlp", samples=samples), trust)
    result = open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    result.engine.close()
    assert result.build is not None and result.build["parity"]["source"] == "samples"


def test_malformed_model_fails_cleanly_in_the_child(model_paths: dict[str, pathlib.Path], tmp_path: pathlib.Path,
                                                     cpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    """Bytes that are not ONNX reach the engine layer (as if a verifier let them through)."""
    good = bundle.load_unverified(_unsigned_copy(model_paths, tmp_path))
    bad_path = good.root / good.manifest.models[0].file
    bad_path.write_bytes(model_paths["malformed"].read_bytes())
    digest, size = bundle.sha256_file(bad_path)
    files = dict(good.files)
    files[good.manifest.models[0].file] = bundle.VerifiedFile(good.manifest.models[0].file, size, digest)
    bad = dataclasses.replace(good, files=MappingProxyType(files))
    with pytest.raises(BackendUnavailable) as info:
        open_engine(bad, cache_dir=cache_dir, probe=cpu_probe)
    assert "; ort-cpu: [ONNXRuntimeError] : 7 : INVALID_PROTOBUF" in str(info.value)
    assert [(f.backend, f.kind) for f in info.value.fallbacks][-1] == ("ort-cpu", "build-failed")
    assert list((cache_dir / "entries").iterdir()) == []
    assert list((cache_dir / "staging").iterdir()) == []


def _unsigned_copy(model_paths: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> pathlib.Path:
    out = tmp_path / "b-malformed"
    bundle.build([model_paths["mlp"]], out, bundle.BuildOptions(name="malformed", version="1.0.0"))
    return out


def test_model_the_runtime_cannot_load_is_a_build_failure_with_the_reason(
        make_bundle: MakeBundle, trust: list[bundle.TrustAnchor], cpu_probe: StaticProbe,
        cache_dir: pathlib.Path) -> None:
    b = bundle.verify(make_bundle("unknown_op"), trust)
    with pytest.raises(BackendUnavailable, match="Frobnicate") as info:
        open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    assert "ort-cpu" in str(info.value)


def test_gpu_backends_fail_over_to_the_cpu_with_each_reason(make_bundle: MakeBundle, gpu_probe: StaticProbe,
                                                            cache_dir: pathlib.Path) -> None:
    """The probe claims a GPU; each GPU backend then really fails here (runtime missing), in order."""
    if SystemProbe().detect().gpu is not None:
        pytest.skip("on a GPU machine the GPU backends build for real (tests/engines/test_gpu.py)")
    b = bundle.load_unverified(make_bundle("mlp", sign=False))
    result = open_engine(b, cache_dir=cache_dir, probe=gpu_probe)
    result.engine.close()
    assert result.backend == "ort-cpu"
    reasons = {f.backend: (f.kind, f.reason) for f in result.fallbacks}
    assert list(reasons) == ["tensorrt", "ort-tensorrt", "ort-cuda"]
    assert reasons["tensorrt"][0] == "build-failed" and "not installed" in reasons["tensorrt"][1]
    assert reasons["ort-tensorrt"][0] == "build-failed"
    assert "lacks TensorrtExecutionProvider" in reasons["ort-tensorrt"][1]
    assert reasons["ort-cuda"][0] == "build-failed" and "lacks CUDAExecutionProvider" in reasons["ort-cuda"][1]


def test_string_model_falls_back_from_every_gpu_backend(make_bundle: MakeBundle, gpu_probe: StaticProbe,
                                                        cache_dir: pathlib.Path) -> None:
    """Same outcome with or without a real GPU: TensorRT cannot take string tensors."""
    b = bundle.load_unverified(make_bundle("string_op", sign=False))
    result = open_engine(b, cache_dir=cache_dir, probe=gpu_probe)
    result.engine.close()
    assert result.backend == "ort-cpu"
    kinds = {f.backend: f.kind for f in result.fallbacks}
    assert kinds == {"tensorrt": "build-failed", "ort-tensorrt": "unsupported", "ort-cuda": "unsupported"}


def test_engine_checks_names_and_serves_threads(make_bundle: MakeBundle, cpu_probe: StaticProbe,
                                                cache_dir: pathlib.Path) -> None:
    b = bundle.load_unverified(make_bundle("multi_io", sign=False))
    result = open_engine(b, backend="ort-cpu", options=EngineOptions(intra_op_threads=1), cache_dir=cache_dir,
                         probe=cpu_probe)
    engine = result.engine
    feeds: dict[str, np.ndarray] = {"features": np.ones((4, 8), np.float32),
                                    "ids": np.arange(16, dtype=np.int64).reshape(4, 4)}
    with pytest.raises(InferenceError, match="expected inputs"):
        engine.infer({"features": feeds["features"]})
    with pytest.raises(InferenceError, match="unknown outputs"):
        engine.infer(feeds, ["nope"])
    assert list(engine.infer(feeds, ["label"])) == ["label"]
    with pytest.raises(InferenceError, match="ort-cpu"):
        engine.infer({"features": np.ones((4, 9), np.float32), "ids": feeds["ids"]})
    want = engine.infer(feeds)["scores"]
    results: list[np.ndarray] = []

    def worker() -> None:
        for _ in range(50):
            results.append(engine.infer(feeds)["scores"])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200 and all(np.array_equal(r, want) for r in results)
    engine.close()
    assert not engine.loaded


def test_plan_sees_the_entry_once_built_and_warm_up_runs_on_load(make_bundle: MakeBundle, cpu_probe: StaticProbe,
                                                                 cache_dir: pathlib.Path) -> None:
    from engines import plan

    b = bundle.load_unverified(make_bundle("dynamic_conv", sign=False))
    assert plan(b, cache_dir=cache_dir, probe=cpu_probe).steps[0].cached is False
    cold = open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    cold.engine.close()
    assert cold.warmup_s is None  # no warm-up on the CPU by default: nothing timed
    assert plan(b, cache_dir=cache_dir, probe=cpu_probe).steps[0].cached is True
    warm = open_engine(b, options=EngineOptions(warmup_iterations=2), cache_dir=cache_dir, probe=cpu_probe)
    warm.engine.close()
    assert warm.cache_hit  # warm-up is a load-time setting: it does not change the cache key
    assert warm.warmup_s is not None and 0 < warm.warmup_s < 10  # the warmed engine's time per batch
