"""The transport-neutral data plane on its own (what HTTP and MQTT both call)."""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import numpy as np
import orjson
import pytest

import bundle
from agent import DataPlane, ModelConfig
from agent.errors import ModelNotFound, Unavailable, ValidationError
from agent.protocol import decode_request, encode_response
from engines import batch_scaling
from tests.agent.conftest import tensor


def _request(x: np.ndarray, **extra: Any) -> bytes:
    return orjson.dumps({"inputs": [tensor("input", x)], **extra})


def test_one_data_plane_serves_across_event_loops(bundles: dict[str, pathlib.Path],
                                                  trust: list[bundle.TrustAnchor], reference: Any) -> None:
    """A daemon may restart its loop; the batcher binds to whichever loop is running."""
    dp = DataPlane()
    dp.load_bundle(bundle.verify(bundles["mlp"], trust), ModelConfig(inline_compute_ms=0))
    x = np.ones((2, 64), np.float32)
    want = reference("mlp", {"input": x})["logits"]
    for _ in range(2):
        resp = asyncio.run(dp.infer("mlp", None, decode_request(_request(x))))
        np.testing.assert_array_equal(resp.outputs[0].data, want)
    asyncio.run(dp.close())


async def test_errors_carry_their_status_for_any_transport(bundles: dict[str, pathlib.Path],
                                                           trust: list[bundle.TrustAnchor]) -> None:
    dp = DataPlane()
    dp.load_bundle(bundle.verify(bundles["mlp"], trust))
    with pytest.raises(ModelNotFound) as nf:
        await dp.infer("nope", None, decode_request(_request(np.ones((1, 64), np.float32))))
    assert nf.value.status == 404
    with pytest.raises(ValidationError) as bad:
        await dp.infer("mlp", "1.0.0", decode_request(_request(np.ones((1, 65), np.float32))))
    assert bad.value.status == 400 and bad.value.tensor == "input"
    assert dp.server_ready() and dp.model_ready("mlp")
    dp.begin_drain()
    assert not dp.server_ready() and dp.server_live()
    with pytest.raises(Unavailable) as un:
        await dp.infer("mlp", None, decode_request(_request(np.ones((1, 64), np.float32))))
    assert un.value.status == 503
    await dp.close()


async def test_fp16_id_and_binary_outputs(bundles: dict[str, pathlib.Path], trust: list[bundle.TrustAnchor],
                                          reference: Any) -> None:
    dp = DataPlane()
    dp.load_bundle(bundle.verify(bundles["fp16"], trust))
    x = np.linspace(-1, 1, 32, dtype=np.float16).reshape(2, 16)
    body = orjson.dumps({"id": "abc", "inputs": [tensor("x", x, "FP16")],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    enc = encode_response(await dp.infer("fp16", None, decode_request(body)))
    head = orjson.loads(enc.header)
    assert head["id"] == "abc" and head["outputs"][0]["datatype"] == "FP16"
    got = np.frombuffer(enc.tail[0], np.float16).reshape(head["outputs"][0]["shape"])
    np.testing.assert_array_equal(got, reference("fp16", {"x": x})["y"])
    meta = dp.model_metadata("fp16")
    assert meta["versions"] == ["1.0.0"]
    assert meta["outpost"]["max_batch_size"] == batch_scaling.worthwhile_batch(dp.get("fp16").runner.batch_scaling, 8)
    await dp.close()


async def test_manifest_batching_is_overridden_per_device(bundles: dict[str, pathlib.Path],
                                                          trust: list[bundle.TrustAnchor]) -> None:
    dp = DataPlane()
    (sm,) = dp.load_bundle(bundle.verify(bundles["mlp"], trust),
                           ModelConfig(max_batch_size=3, max_queue_delay_ms=0.5, instances=2))
    assert (sm.max_batch_size, sm.max_queue_delay_ms, sm.runner.instances) == (3, 0.5, 2)
    plain = DataPlane()
    (other,) = plain.load_bundle(bundle.verify(bundles["mlp"], trust))
    # the manifest's, capped at what this engine's build measured pays (timing: 4 on a busy machine is possible)
    assert other.runner.batch_scaling is not None
    expected = batch_scaling.worthwhile_batch(other.runner.batch_scaling, 8)
    assert 1 <= expected <= 8
    assert (other.max_batch_size, other.max_queue_delay_ms) == (expected, 2.0)
    await dp.close()
    await plain.close()
