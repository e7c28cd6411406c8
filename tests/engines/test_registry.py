"""Backend selection: the manifest's preference order filtered by the probe, with reasons. Builds nothing."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

import bundle
from engines import BACKENDS, BackendUnavailable, BuildPlan, EngineOptions, StaticProbe, plan
from engines.shapes import DEFAULT_DIM_RANGE
from tests.conftest import MakeBundle


def _plan(make_bundle: MakeBundle, probe: StaticProbe, cache_dir: pathlib.Path, *models: str, backend: str = "auto",
          **opts: object) -> BuildPlan:
    b = bundle.load_unverified(make_bundle(*models, sign=False, **opts))
    return plan(b, backend=backend, cache_dir=cache_dir, probe=probe)


def test_cpu_machine_picks_ort_cpu_and_says_why_not_the_gpu_backends(
        make_bundle: MakeBundle, cpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    p = _plan(make_bundle, cpu_probe, cache_dir)
    assert [s.backend for s in p.steps] == ["ort-cpu"]
    skipped = {f.backend: f for f in p.skipped}
    assert list(skipped) == ["tensorrt", "ort-tensorrt", "ort-cuda"]
    for f in skipped.values():
        assert f.kind == "no-gpu"
        assert "no NVIDIA GPU detected" in f.reason


def test_gpu_machine_tries_tensorrt_first_and_cpu_last(
        make_bundle: MakeBundle, gpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    p = _plan(make_bundle, gpu_probe, cache_dir)
    assert [s.backend for s in p.steps] == ["tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu"]
    assert p.skipped == ()
    assert not any(s.cached for s in p.steps)


def test_manifest_preference_order_is_respected(
        make_bundle: MakeBundle, gpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    p = _plan(make_bundle, gpu_probe, cache_dir, engines=("cuda", "cpu"))
    assert [s.backend for s in p.steps] == ["ort-cuda", "ort-cpu"]
    assert {f.backend: f.kind for f in p.skipped} == {"tensorrt": "not-preferred", "ort-tensorrt": "not-preferred"}


def test_gpu_without_runtimes_lists_what_is_missing(
        make_bundle: MakeBundle, gpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    bare = StaticProbe(dataclasses.replace(gpu_probe.detect(), tensorrt_version=None, polygraphy_available=False,
                                           ort_providers=("CPUExecutionProvider",)))
    p = _plan(make_bundle, bare, cache_dir)
    assert [s.backend for s in p.steps] == ["ort-cpu"]
    reasons = {f.backend: (f.kind, f.reason) for f in p.skipped}
    assert reasons["tensorrt"] == ("not-installed", "TensorRT is not installed (the `gpu` extra)")
    assert reasons["ort-tensorrt"][0] == "not-installed" and "TensorrtExecutionProvider" in reasons["ort-tensorrt"][1]
    assert reasons["ort-cuda"][0] == "not-installed" and "CUDAExecutionProvider" in reasons["ort-cuda"][1]


def test_gpu_below_the_bundle_minimum_compute_capability_is_skipped(
        make_bundle: MakeBundle, gpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    p = _plan(make_bundle, gpu_probe, cache_dir, min_compute_capability="9.0")
    assert [s.backend for s in p.steps] == ["ort-cpu"]
    for f in p.skipped:
        assert f.kind == "unsupported"
        assert "8.6" in f.reason and "9.0" in f.reason


def test_string_model_is_kept_off_ort_gpu_backends(
        make_bundle: MakeBundle, gpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    p = _plan(make_bundle, gpu_probe, cache_dir, "string_op")
    assert [s.backend for s in p.steps] == ["tensorrt", "ort-cpu"]  # TensorRT's parser gets its say at build time
    assert {f.backend: f.kind for f in p.skipped} == {"ort-tensorrt": "unsupported", "ort-cuda": "unsupported"}


def test_named_backend_that_cannot_run_is_an_error_with_the_reason(
        make_bundle: MakeBundle, cpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    with pytest.raises(BackendUnavailable, match="backend tensorrt cannot run here: no NVIDIA GPU"):
        _plan(make_bundle, cpu_probe, cache_dir, backend="tensorrt")
    with pytest.raises(BackendUnavailable, match="unknown backend 'onnx-magic'"):
        _plan(make_bundle, cpu_probe, cache_dir, backend="onnx-magic")


def test_named_backend_is_tried_alone(
        make_bundle: MakeBundle, gpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    p = _plan(make_bundle, gpu_probe, cache_dir, backend="ort-cpu")
    assert [s.backend for s in p.steps] == ["ort-cpu"] and p.skipped == ()


def test_bundle_for_another_architecture_is_refused(
        make_bundle: MakeBundle, cpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    riscv = StaticProbe(dataclasses.replace(cpu_probe.detect(), arch="riscv64"))
    with pytest.raises(BackendUnavailable, match="this machine is riscv64"):
        _plan(make_bundle, riscv, cache_dir)


def test_shape_profile_from_dynamic_dims_and_batch_limit(
        make_bundle: MakeBundle, cpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    p = _plan(make_bundle, cpu_probe, cache_dir, "dynamic_conv", max_batch_size=16)
    ranges = dict(p.profile.dims)
    assert (ranges["batch"].min, ranges["batch"].opt, ranges["batch"].max, ranges["batch"].batch) == (1, 8, 16, True)
    assert (ranges["height"].min, ranges["height"].opt, ranges["height"].max) == DEFAULT_DIM_RANGE
    b = bundle.load_unverified(make_bundle("dynamic_conv", sign=False))
    custom = plan(b, options=EngineOptions(dim_ranges=(("height", 32, 224, 512),)), cache_dir=cache_dir,
                  probe=cpu_probe)
    assert dict(custom.profile.dims)["height"].opt == 224
    assert custom.steps[0].key != _plan(make_bundle, cpu_probe, cache_dir, "dynamic_conv").steps[0].key


def test_every_backend_is_in_the_table() -> None:
    assert set(BACKENDS) == {"tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu"}


def test_each_backend_serves_the_manifest_engine_kind_the_walk_expands_it_from() -> None:
    from engines.registry import ENGINE_KINDS, backend_class

    for engine_kind, backends in ENGINE_KINDS.items():
        for name in backends:
            assert backend_class(name).engine_kind == engine_kind
