"""Fixtures of the serving tests: real bundles, real in-process servers on loopback, bare ORT references."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bundle
from agent import DataPlane, ModelConfig, ServerConfig
from agent.http_server import HttpServer


def lookup() -> onnx.ModelProto:
    """y = table[idx] + x: an index past the table's 10 rows fails in the runtime, taking its batch down."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    nodes = [helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0),
             helper.make_node("Add", ["rows", "x"], ["y"])]
    graph = helper.make_graph(
        nodes, "lookup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="session")
def agent_model_paths(model_paths: dict[str, pathlib.Path],
                      tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    out = tmp_path_factory.mktemp("agent-models")
    path = out / "lookup.onnx"
    onnx.save_model(lookup(), str(path))
    return {**model_paths, "lookup": path}


@pytest.fixture(scope="session")
def bundles(agent_model_paths: dict[str, pathlib.Path], keypair: tuple[pathlib.Path, pathlib.Path],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """One signed bundle per model, named after it, version 1.0.0 (built once per session)."""
    root = tmp_path_factory.mktemp("agent-bundles")
    out = {}
    for name in ("mlp", "multi_io", "types", "dynamic_conv", "fp16", "cnn", "lookup"):
        dest = root / name
        bundle.build([agent_model_paths[name]], dest,
                     bundle.BuildOptions(name=name, version="1.0.0", max_batch_size=8, max_queue_delay_ms=2.0))
        bundle.sign_directory(dest, keypair[0])
        out[name] = dest
    return out


@pytest.fixture(scope="session")
def reference(agent_model_paths: dict[str, pathlib.Path]) -> Callable[[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Bare ONNX Runtime: what every served answer must equal."""
    sessions: dict[str, ort.InferenceSession] = {}

    def run(model: str, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        if model not in sessions:
            sessions[model] = ort.InferenceSession(str(agent_model_paths[model]), providers=["CPUExecutionProvider"])
        s = sessions[model]
        names = [o.name for o in s.get_outputs()]
        return dict(zip(names, s.run(names, feeds), strict=True))

    return run


@dataclass
class Served:
    server: HttpServer
    dataplane: DataPlane
    url: str
    session: aiohttp.ClientSession

    async def infer_json(self, model: str, inputs: Sequence[dict[str, Any]], *,
                         outputs: Sequence[dict[str, Any]] | None = None, headers: dict[str, str] | None = None,
                         version: str | None = None) -> tuple[int, Any]:
        doc: dict[str, Any] = {"inputs": list(inputs)}
        if outputs is not None:
            doc["outputs"] = list(outputs)
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        async with self.session.post(self.url + path, json=doc, headers=headers) as r:
            return r.status, await r.json(content_type=None)


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(trust: list[bundle.TrustAnchor]) -> AsyncIterator[ServeFactory]:
    """Start an HttpServer on a free loopback port with the given bundles: await serve([dir...], model_config=...)."""
    started: list[Served] = []

    async def start(dirs: Sequence[pathlib.Path], model_config: ModelConfig | None = None,
                    server_config: ServerConfig | None = None) -> Served:
        dp = DataPlane()
        for d in dirs:
            dp.load_bundle(bundle.verify(d, trust), model_config or ModelConfig())
        server = HttpServer(dp, server_config or ServerConfig(port=0))
        await server.start()
        served = Served(server, dp, server.url, aiohttp.ClientSession())
        started.append(served)
        return served

    yield start
    for s in started:
        await s.session.close()
        await s.server.stop()


def tensor(name: str, array: np.ndarray, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist()}


@pytest.fixture
async def dataplane(make_bundle: Callable[..., pathlib.Path],
                    trust: list[bundle.TrustAnchor]) -> AsyncIterator[DataPlane]:
    """The signed MLP bundle on a data plane with no transport: the MQTT tests put their front end on it."""
    from tests.agent.mqtt_broker import serving_dataplane

    dp = await serving_dataplane(make_bundle("mlp", name="mlp", version="1.0.0"), trust)
    yield dp
    await dp.close()
