"""The data plane's zero-downtime switch: prepare off the loop, swap on it, drain the old version."""

from __future__ import annotations

import asyncio
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest

import bundle
from agent import DataPlane, ModelConfig
from agent.errors import ModelNotFound
from agent.protocol import decode_request
from agent.runner import EngineSource
from tests.models.make_models import mlp


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[pathlib.Path, pathlib.Path]
             ) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """mlp 1.0.0 and 2.0.0 with different weights: (bundle dir, model file)."""
    root = tmp_path_factory.mktemp("swap")
    out = {}
    for seed, version in ((1, "1.0.0"), (2, "2.0.0")):
        model = root / f"mlp-{seed}.onnx"
        onnx.save_model(mlp(seed=seed), str(model))
        dest = root / f"b-{version}"
        bundle.build([model], dest, bundle.BuildOptions(name="mlp", version=version, max_batch_size=8,
                                                        max_queue_delay_ms=2.0))
        bundle.sign_directory(dest, keypair[0])
        out[version] = (dest, model)
    return out


def _expect(model: pathlib.Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(s.run(["logits"], {"input": x})[0])


def _req(x: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "data": x.ravel().tolist()}]})


async def test_swap_under_load_fails_nothing_and_old_version_drains(
        versions: dict[str, tuple[pathlib.Path, pathlib.Path]], trust: list[bundle.TrustAnchor],
        tmp_path: pathlib.Path) -> None:
    dp = DataPlane(engines=EngineSource(cache_dir=tmp_path / "cache"))
    config = ModelConfig(inline_compute_ms=0, max_queue=1024)
    v1 = await asyncio.to_thread(dp.prepare, bundle.verify(versions["1.0.0"][0], trust), config)
    with pytest.raises(ModelNotFound):  # prepared is not served
        dp.get("mlp")
    await dp.swap(v1)
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    want = {v: _expect(versions[v][1], x) for v in versions}
    answers: list[str] = []
    errors: list[BaseException] = []
    stop = asyncio.Event()

    per_client: list[list[str]] = [[] for _ in range(8)]

    async def client(mine: list[str]) -> None:
        while not stop.is_set():
            try:
                r = await dp.infer("mlp", None, decode_request(_req(x)))
            except Exception as e:
                errors.append(e)
                continue
            np.testing.assert_allclose(r.outputs[0].data.reshape(1, 10), want[r.model_version], rtol=1e-5)
            answers.append(r.model_version)
            mine.append(r.model_version)

    clients = [asyncio.create_task(client(mine)) for mine in per_client]
    await asyncio.sleep(0.2)
    v2 = await asyncio.to_thread(dp.prepare, bundle.verify(versions["2.0.0"][0], trust), config)
    (old,) = await dp.swap(v2)
    assert old.version == "1.0.0" and dp.active_version("mlp") == "2.0.0"
    n_at_swap = len(answers)
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*clients)
    await dp.settle()
    assert not errors
    assert "1.0.0" in answers[:n_at_swap] and set(answers[n_at_swap:]) >= {"2.0.0"}
    # after the swap only the requests already in flight (one per client) finish on 1.0.0; and
    # once a client is answered by 2.0.0, all its later requests are (no way back to the old one)
    assert answers[n_at_swap:].count("1.0.0") <= len(per_client)
    for mine in per_client:
        first_new = mine.index("2.0.0")
        assert set(mine[first_new:]) == {"2.0.0"}
    assert old.runner._closed and old.active_requests == 0
    text = dp.metrics.exposition()[0].decode()
    assert 'outpost_model_switches_total{active_version="2.0.0",model="mlp"} 1.0' in text
    await dp.close()


async def test_keep_previous_then_point_back_and_unload_drains_queue(
        versions: dict[str, tuple[pathlib.Path, pathlib.Path]], trust: list[bundle.TrustAnchor],
        tmp_path: pathlib.Path) -> None:
    dp = DataPlane(engines=EngineSource(cache_dir=tmp_path / "cache"))
    config = ModelConfig(inline_compute_ms=0, max_queue_delay_ms=50.0, max_queue=1024)
    await dp.swap(await asyncio.to_thread(dp.prepare, bundle.verify(versions["1.0.0"][0], trust), config))
    await dp.swap(await asyncio.to_thread(dp.prepare, bundle.verify(versions["2.0.0"][0], trust), config),
                  keep_previous=True)
    assert dp.active_version("mlp") == "2.0.0" and dp.get("mlp", "1.0.0")
    dp.activate("mlp", "1.0.0")  # last-known-good: instant, nothing rebuilt
    x = np.zeros((1, 64), np.float32)
    assert (await dp.infer("mlp", None, decode_request(_req(x)))).model_version == "1.0.0"
    # queued requests (a 50 ms batching window) finish on the version being unloaded
    pending = [asyncio.create_task(dp.infer("mlp", "2.0.0", decode_request(_req(x)))) for _ in range(5)]
    await asyncio.sleep(0)
    await dp.unload("mlp", "2.0.0")
    results = await asyncio.gather(*pending)
    assert [r.model_version for r in results] == ["2.0.0"] * 5
    with pytest.raises(ModelNotFound):
        dp.get("mlp", "2.0.0")
    await dp.close()


def test_tests_never_build_into_the_users_cache(private_engine_cache: pathlib.Path) -> None:
    import os

    from engines import default_cache_dir
    assert default_cache_dir() == private_engine_cache
    assert os.environ["OUTPOST_ENGINE_CACHE"] == str(private_engine_cache)
