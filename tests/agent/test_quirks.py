"""The quirk zoo (tests/models/quirks.py) end to end: build without samples, sign, verify, serve over
HTTP and MQTT, and answer what ONNX Runtime run directly answers."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest

import bundle
from agent import DataPlane, ModelConfig, ServerConfig
from agent.http_server import HttpServer
from agent.runner import EngineSource
from agent.validation import batch_dim
from engines.batch_scaling import worthwhile_batch
from tests.agent.conftest import tensor
from tests.agent.mqtt_broker import PREFIX, REPLIES, Requester, front_end, running_broker
from tests.models.quirks import STFT_LONG_PAD, STFT_PAD, iris_rows, write_quirks

pytestmark = pytest.mark.timeout(120)

#: model -> the inputs a real client sends (deliberately not the engines' synthesized sizes)
INPUTS: dict[str, Callable[[], dict[str, np.ndarray]]] = {
    "stft": lambda: {"audio": np.random.default_rng(1).standard_normal((2, 480)).astype(np.float32)},
    "stft_long": lambda: {"audio": np.random.default_rng(3).standard_normal((2, 2600)).astype(np.float32)},
    "unknown": lambda: {"x": np.random.default_rng(2).standard_normal((2, 3, 12, 48)).astype(np.float32)},
    "zipmap": lambda: {"X": iris_rows(5)},
}


@pytest.fixture(scope="module")
def quirk_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    return write_quirks(tmp_path_factory.mktemp("quirks"))


@pytest.fixture(scope="module")
def quirk_bundles(quirk_paths: dict[str, pathlib.Path], keypair: tuple[pathlib.Path, pathlib.Path],
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("quirk-bundles")
    out = {}
    for name, path in quirk_paths.items():
        manifest = bundle.build([path], root / name, bundle.BuildOptions(name=name, version="1.0.0", max_batch_size=8))
        assert manifest.samples is None
        bundle.sign_directory(root / name, keypair[0])
        out[name] = root / name
    return out


def ort_direct(path: pathlib.Path, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds), strict=True))


def expected(name: str, path: pathlib.Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ORT's own answer, in the served form: a ZipMap's list of {label: p} as rows in label order."""
    out = ort_direct(path, feeds)
    if name == "zipmap":
        maps = out["output_probability"]
        out["output_probability"] = np.array([[m[k] for k in (0, 1, 2)] for m in maps], np.float32)
    return out


@pytest.fixture
async def zoo(quirk_bundles: dict[str, pathlib.Path], trust: list[bundle.TrustAnchor],
              tmp_path: pathlib.Path) -> AsyncIterator[tuple[DataPlane, HttpServer]]:
    dp = DataPlane(engines=EngineSource(cache_dir=str(tmp_path / "ec")))
    for d in quirk_bundles.values():
        dp.load_bundle(bundle.verify(d, trust), ModelConfig(max_queue_delay_ms=20.0))
    server = HttpServer(dp, ServerConfig(port=0))
    await server.start()
    yield dp, server
    await server.stop()


def _check(name: str, outputs: list[dict[str, Any]], want: dict[str, np.ndarray]) -> None:
    assert sorted(o["name"] for o in outputs) == sorted(want)
    for o in outputs:
        exp = np.asarray(want[o["name"]])
        got = np.array(o["data"], dtype=exp.dtype).reshape(o["shape"])
        if exp.dtype.kind == "f":
            np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6, err_msg=f"{name}.{o['name']}")
        else:
            np.testing.assert_array_equal(got, exp, err_msg=f"{name}.{o['name']}")


async def test_every_quirk_serves_over_http_equal_to_ort(zoo: tuple[DataPlane, HttpServer],
                                                         quirk_paths: dict[str, pathlib.Path]) -> None:
    import aiohttp

    _, server = zoo
    async with aiohttp.ClientSession() as http:
        for name, make in INPUTS.items():
            feeds = make()
            doc = {"inputs": [tensor(k, v) for k, v in feeds.items()]}
            async with http.post(f"{server.url}/v2/models/{name}/infer", json=doc) as r:
                body = await r.json()
                assert r.status == 200, (name, body)
            _check(name, body["outputs"], expected(name, quirk_paths[name], feeds))


async def test_an_stft_beyond_every_synthesized_length_is_served_with_parity_unchecked(
        zoo: tuple[DataPlane, HttpServer]) -> None:
    import aiohttp

    _, server = zoo
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/v2/models/stft_long") as r:
            meta = await r.json()
        async with http.get(f"{server.url}/v2/models/stft_long/ready") as r:
            assert r.status == 200
        async with http.get(f"{server.url}/v2/health/ready") as r:
            assert r.status == 200
    parity = meta["outpost"]["parity"]
    assert parity["checked"] is False
    assert parity["note"].startswith("not checked: the model rejected synthesized inputs (")
    assert f"pre-pad ({STFT_LONG_PAD})" in parity["note"] and "add sample inputs with `--samples`" in parity["note"]


def test_a_short_stft_is_checked_at_a_synthesized_length_it_accepts(zoo: tuple[DataPlane, HttpServer],
                                                                   tmp_path: pathlib.Path,
                                                                   quirk_bundles: dict[str, pathlib.Path],
                                                                   trust: list[bundle.TrustAnchor]) -> None:
    from engines import open_engine

    dp, _ = zoo
    assert dp.model_metadata("stft")["outpost"]["parity"] == {"checked": True, "note": None}
    result = open_engine(bundle.verify(quirk_bundles["stft"], trust), cache_dir=tmp_path / "ec", backend="ort-cpu")
    result.engine.close()
    assert result.parity is not None and result.parity["dims"]["samples"] > STFT_PAD


async def test_unknown_dims_are_independent_and_the_leading_one_batches(
        zoo: tuple[DataPlane, HttpServer], quirk_paths: dict[str, pathlib.Path]) -> None:
    import asyncio

    import aiohttp

    dp, server = zoo
    sm = dp.get("unknown")
    assert sm.runner.inputs[0].shape[0] == "batch" and sm.runner.outputs[0].shape[0] == "batch"
    assert batch_dim(sm.runner.inputs, sm.runner.outputs) == "batch"
    assert sm.max_batch_size == worthwhile_batch(sm.runner.batch_scaling, 8)  # the bundle's 8, capped by what pays
    images = [np.random.default_rng(i).standard_normal((1, 3, 48, 192)).astype(np.float32) for i in range(4)]
    async with aiohttp.ClientSession() as http:
        async def one(x: np.ndarray) -> dict[str, Any]:
            async with http.post(f"{server.url}/v2/models/unknown/infer",
                                 json={"inputs": [tensor("x", x)]}) as r:
                assert r.status == 200
                return dict(await r.json())

        answers = await asyncio.gather(*(one(x) for x in images))
    for x, body in zip(images, answers, strict=True):
        _check("unknown", body["outputs"], expected("unknown", quirk_paths["unknown"], {"x": x}))


async def test_zipmap_labels_are_published_and_label_equals_ort(zoo: tuple[DataPlane, HttpServer]) -> None:
    dp, _ = zoo
    meta = dp.model_metadata("zipmap")
    assert meta["outpost"]["labels"] == {"output_probability": [0, 1, 2]}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "output_label": ("INT64", [-1]), "output_probability": ("FP32", [-1, 3])}


@pytest.fixture
def broker_requester(tmp_path: pathlib.Path) -> Iterator[tuple[Any, Requester]]:
    with running_broker(tmp_path / "broker") as b:
        r = Requester(b.port).connect()
        r.subscribe(f"{REPLIES}/#")
        yield b, r
        r.close()


async def test_every_quirk_serves_over_mqtt_equal_to_ort(zoo: tuple[DataPlane, HttpServer],
                                                         broker_requester: tuple[Any, Requester],
                                                         quirk_paths: dict[str, pathlib.Path]) -> None:
    dp, _ = zoo
    broker, requester = broker_requester
    async with front_end(dp, broker):
        for i, (name, make) in enumerate(INPUTS.items()):
            feeds = make()
            payload = orjson.dumps({"inputs": [tensor(k, v) for k, v in feeds.items()]})
            await requester.apublish(f"{PREFIX}/models/{name}/infer", payload, response_topic=f"{REPLIES}/q{i}",
                                     correlation=name.encode())
            reply = await requester.aget(30)
            assert reply.correlation == name.encode() and reply.user_properties["status"] == "200", reply.payload
            _check(name, orjson.loads(reply.payload)["outputs"], expected(name, quirk_paths[name], feeds))
