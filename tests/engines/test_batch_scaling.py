"""The build measures time per item by batch size (engines.batch_scaling); the agent caps batches by it."""

from __future__ import annotations

import pathlib

import onnx
import pytest
from onnx import TensorProto, helper

import bundle
from agent import DataPlane, ModelConfig
from engines import StaticProbe, open_engine
from engines.batch_scaling import worthwhile_batch
from tests.conftest import MakeBundle


def test_the_build_measures_each_batch_size_and_a_cache_hit_keeps_it(
        make_bundle: MakeBundle, cpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    b = bundle.load_unverified(make_bundle("mlp", sign=False, max_batch_size=16))
    built = open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    built.engine.close()
    assert built.batch_scaling is not None
    assert sorted(built.batch_scaling) == [1, 2, 4, 8, 16]  # up to the profile's batch max
    assert all(0 < s < 0.1 for s in built.batch_scaling.values())
    assert built.build is not None and built.build["batch_scaling"] == {str(k): v for k, v in
                                                                         built.batch_scaling.items()}
    hit = open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    hit.engine.close()
    assert hit.cache_hit and hit.batch_scaling == built.batch_scaling  # read from the entry, not measured again


def test_a_model_without_a_batch_dim_has_its_call_time_only(tmp_path: pathlib.Path, cpu_probe: StaticProbe,
                                                             cache_dir: pathlib.Path) -> None:
    """No batch to scale, but how long a call takes still tells the instance policy how compute-bound it is
    (fixed-shape exports such as ONNX's own light_resnet50 used to get "time per batch unknown")."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what this ONNX Runtime reads (as tests/models does)
    path = tmp_path / "fixed.onnx"
    onnx.save(model, str(path))
    dest = tmp_path / "bundle"
    bundle.build([path], dest, bundle.BuildOptions(name="fixed", version="1.0.0"))
    result = open_engine(bundle.load_unverified(dest), cache_dir=cache_dir, probe=cpu_probe)
    result.engine.close()
    assert result.batch_scaling is not None and list(result.batch_scaling) == [1]
    assert 0 < result.batch_scaling[1] < 0.1
    assert worthwhile_batch(result.batch_scaling, 8) == 8  # nothing to compare: the configured size stands


def test_a_tiny_models_timing_outlasts_a_preemption(make_bundle: MakeBundle, cpu_probe: StaticProbe,
                                                     cache_dir: pathlib.Path) -> None:
    """Five calls of a few microseconds can all land in one preemption on a busy machine (CI capped the
    MLP at batch 4 that way): calls go on until `MIN_SPENT_S` has been spent, so the minimum shows."""
    import time

    import numpy as np

    from engines import batch_scaling

    built = open_engine(bundle.load_unverified(make_bundle("mlp", sign=False)), cache_dir=cache_dir, probe=cpu_probe)

    class Preempted:  # the real engine, its first calls delayed as a neighbour's time slice would
        calls = 0

        def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            self.calls += 1
            if self.calls <= 1 + batch_scaling.MIN_CALLS:  # the warm-up call and the first five timed ones
                time.sleep(0.005)
            return built.engine.infer(feeds)

    engine = Preempted()
    try:
        best = batch_scaling._best_call(engine, {"input": np.zeros((8, 64), np.float32)})  # type: ignore[arg-type]
    finally:
        built.engine.close()
    assert best < 0.002, (best, engine.calls)  # the engine's own time, not the 5 ms stalls
    assert 1 + batch_scaling.MIN_CALLS < engine.calls <= 1 + batch_scaling.MAX_CALLS, (best, engine.calls)


@pytest.mark.parametrize(("per_item", "configured", "want"), [
    (None, 8, 8),  # not measured (an entry from before, or no batch dim): the bundle's value
    ({1: 4.0e-3}, 8, 8),  # one size only: nothing to compare
    ({1: 3.97e-3, 2: 3.84e-3, 4: 4.18e-3, 8: 4.20e-3}, 8, 1),  # the CNN on 2 cores: batch 1 within 5% of the best
    ({1: 4.54e-3, 2: 4.20e-3, 4: 4.46e-3, 8: 4.68e-3}, 8, 2),  # batch 2 best, batch 1 7% behind it
    ({1: 6e-6, 2: 3.7e-6, 4: 1.3e-6, 8: 1.5e-6, 16: 8.6e-7, 32: 4.8e-7}, 32, 32),  # the MLP: batching pays
    ({1: 6e-6, 2: 3.7e-6, 4: 1.3e-6, 8: 1.5e-6, 16: 8.6e-7, 32: 4.8e-7}, 8, 4),  # capped by the config first
    ({1: 1e-3, 2: 6e-4, 4: 3e-4}, 16, 16),  # still gaining at the largest batch measured: keep the bundle's
    ({1: 1e-3, 2: 1e-3, 4: 1e-3}, 1, 1),
])
def test_worthwhile_batch(per_item: dict[int, float] | None, configured: int, want: int) -> None:
    assert worthwhile_batch(per_item, configured) == want


async def test_the_agent_caps_the_bundles_batch_at_what_pays_unless_told(
        make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    signed = make_bundle("cnn", name="cnn", max_batch_size=8)
    dp = DataPlane()
    (cnn,) = dp.load_bundle(bundle.verify(signed, trust))
    scaling = cnn.runner.batch_scaling
    assert scaling is not None and sorted(scaling) == [1, 2, 4, 8]
    meta = dp.model_metadata("cnn")["outpost"]
    assert meta["max_batch_size"] == cnn.batcher.max_batch_size == worthwhile_batch(scaling, 8)
    assert meta["batch_scaling"] == {str(b): s for b, s in sorted(scaling.items())}
    assert cnn.batcher.max_request_items == 64  # a client's own batch is still taken up to 8 x the bundle's
    await dp.close()

    dp = DataPlane()
    (told,) = dp.load_bundle(bundle.verify(signed, trust), ModelConfig(max_batch_size=8))
    assert told.batcher.max_batch_size == 8  # an explicit setting is kept as given
    await dp.close()
