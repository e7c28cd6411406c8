"""The parity check's tolerances and generated inputs."""

from __future__ import annotations

import numpy as np
import pytest

from bundle import TensorSpec
from engines import ParityError
from engines.parity import candidate_inputs, compare, generate_inputs
from engines.shapes import profile_for


def test_fp32_rejects_what_fp16_accepts() -> None:
    ref = {"y": np.linspace(-3, 3, 100, dtype=np.float32)}
    off = {"y": ref["y"] + np.float32(5e-3)}
    with pytest.raises(ParityError, match="output 'y' differs from the ORT CPU reference"):
        compare(off, ref, "fp32", "tensorrt")
    report = compare(off, ref, "fp16", "tensorrt")
    assert report.max_abs_error["y"] == pytest.approx(5e-3, rel=1e-3)


def test_exact_dtypes_and_nan_positions_must_match() -> None:
    with pytest.raises(ParityError, match="exact match required for int64"):
        compare({"l": np.array([1, 2, 4])}, {"l": np.array([1, 2, 3])}, "fp16")
    with pytest.raises(ParityError, match="NaN"):
        compare({"y": np.array([1.0, np.nan])}, {"y": np.array([1.0, 2.0])}, "fp16")
    assert compare({"y": np.array([np.nan, 1.0])}, {"y": np.array([np.nan, 1.0])}, "fp32").max_abs_error == {"y": 0.0}


def test_shape_and_missing_outputs_are_parity_failures() -> None:
    with pytest.raises(ParityError, match="shape"):
        compare({"y": np.zeros((2, 3))}, {"y": np.zeros((3, 2))}, "fp32")
    with pytest.raises(ParityError, match="missing"):
        compare({}, {"y": np.zeros(1)}, "fp32")


def test_generated_inputs_use_sample_sizes_for_dynamic_dims() -> None:
    specs = (TensorSpec("image", "float32", ("batch", 3, "height", "width")),
             TensorSpec("ids", "int64", ("batch", 4)), TensorSpec("mask", "bool", ("batch", "seq")),
             TensorSpec("text", "string", ("n",)), TensorSpec("half", "float16", ("batch", 16)))
    feeds = generate_inputs(specs, profile_for(specs, max_batch_size=32))
    assert feeds["image"].shape == (2, 3, 32, 32) and feeds["image"].dtype == np.float32
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].min() >= 0 and feeds["ids"].max() < 4
    assert feeds["mask"].dtype == np.bool_
    assert feeds["text"].shape == (2,) and all(isinstance(t, str) for t in feeds["text"])
    assert feeds["half"].dtype == np.float16
    again = generate_inputs(specs, profile_for(specs, 32))
    assert all(np.array_equal(a, again[k]) for k, a in feeds.items())


def test_samples_are_used_only_when_they_cover_every_input(tmp_path) -> None:  # type: ignore[no-untyped-def]
    specs = (TensorSpec("a", "float32", ("batch", 2)), TensorSpec("b", "float32", ("batch", 2)))
    partial = tmp_path / "partial.npz"
    np.savez(partial, a=np.ones((1, 2), np.float32))
    assert next(candidate_inputs(specs, profile_for(specs, 8), partial)).source == "generated"
    full = tmp_path / "full.npz"
    np.savez(full, a=np.ones((1, 2), np.float32), b=np.zeros((1, 2), np.float32))
    first = next(candidate_inputs(specs, profile_for(specs, 8), full))
    assert first.source == "samples" and first.feeds["a"].shape == (1, 2)


def test_synthesized_candidates_take_dims_named_in_samples_then_grow_within_bounds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    specs = (TensorSpec("audio", "float32", ("batch", "samples")), TensorSpec("gain", "float32", ("batch", "bands")))
    partial = tmp_path / "partial.npz"
    np.savez(partial, audio=np.ones((1, 480), np.float32))
    cands = list(candidate_inputs(specs, profile_for(specs, 8), partial))
    assert all(c.dims["samples"] == 480 for c in cands)  # named by the sample: never guessed
    assert [c.dims["bands"] for c in cands] == [32, 224, 1024]  # clamped to the default range's max
    assert all(c.dims["batch"] == 1 for c in cands)  # the sample's batch too
    assert all(np.array_equal(c.feeds["audio"], np.ones((1, 480), np.float32)) for c in cands)
    big = (TensorSpec("img", "float32", ("batch", 3, "h", "w")),)
    sizes = [c.dims["h"] for c in candidate_inputs(big, profile_for(big, 8, {"h": (1, 64, 20000),
                                                                             "w": (1, 64, 20000)}), None)]
    assert sizes == [32, 224, 1024]  # 16000x16000 images are over MAX_SYNTH_ELEMENTS: not tried
