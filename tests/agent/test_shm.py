"""System shared-memory tensors, driven by tritonclient as a local camera pipeline would.

tritonclient's calls block, so each runs in a thread while the in-process
server keeps serving on the loop. Every refused request is followed by a
normal one that must return bare ONNX Runtime's exact answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import pathlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as tritonhttp
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from agent import ModelConfig, ServerConfig
from agent.protocol import decode_request
from agent.shm import ClientRegions, RegionError, RegionTable
from tests.agent.conftest import Served, ServeFactory
from tests.agent.test_serve_cli import ServeProcess

Reference = Callable[[str, dict[str, np.ndarray]], dict[str, Any]]
RNG = np.random.default_rng(13)


class Regions:
    """Client-side regions created for one test, destroyed (unmapped and unlinked) at its end."""

    def __init__(self) -> None:
        self.handles: dict[str, Any] = {}

    def create(self, name: str, byte_size: int) -> tuple[Any, str]:
        key = f"/outpost-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        self.handles[name] = handle
        return handle, key

    def destroy(self, name: str) -> None:
        shm.destroy_shared_memory_region(self.handles.pop(name))

    def close(self) -> None:
        for name in list(self.handles):
            self.destroy(name)


@pytest.fixture
def regions() -> Iterator[Regions]:
    r = Regions()
    yield r
    r.close()


@pytest.fixture
async def served(serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> Served:
    return await serve([bundles["mlp"], bundles["multi_io"], bundles["cnn"]],
                       ModelConfig(max_batch_size=8, instances=1),
                       ServerConfig(port=0, shared_memory=True))


@pytest.fixture
async def client(served: Served) -> AsyncIterator[AsyncTriton]:
    c = AsyncTriton(served.url, network_timeout=60)
    yield c
    await c.aclose()


class AsyncTriton:
    """tritonclient.http in one thread of its own (its gevent hub must not change threads), awaitable."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._client = self._pool.submit(tritonhttp.InferenceServerClient, url.removeprefix("http://"),
                                         **kwargs).result()

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        fn = getattr(self._client, name)

        async def run(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

        return run

    async def aclose(self) -> None:
        await self.close()
        self._pool.shutdown()


def shm_input(name: str, arr: np.ndarray, datatype: str, region: str, offset: int = 0) -> tritonhttp.InferInput:
    i = tritonhttp.InferInput(name, list(arr.shape), datatype)
    i.set_shared_memory(region, arr.nbytes, offset)
    return i


def data_input(name: str, arr: np.ndarray, datatype: str, binary: bool) -> tritonhttp.InferInput:
    i = tritonhttp.InferInput(name, list(arr.shape), datatype)
    i.set_data_from_numpy(arr, binary_data=binary)
    return i


def shm_output(name: str, region: str, byte_size: int, offset: int = 0) -> tritonhttp.InferRequestedOutput:
    o = tritonhttp.InferRequestedOutput(name, binary_data=False)
    o.set_shared_memory(region, byte_size, offset)
    return o


async def refused(client: Any, match: str, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(InferenceServerException, match=match) as e:
        await client.infer(*args, **kwargs)
    assert e.value.status() == "400", e.value


async def mlp_over_shm(client: Any, regions: Regions, reference: Reference) -> None:
    """The normal request that proves the server still serves: input and output in shared memory."""
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    tag = uuid.uuid4().hex[:8]
    h_in, k_in = regions.create(f"in-{tag}", x.nbytes)
    h_out, k_out = regions.create(f"out-{tag}", 2 * 10 * 4)
    shm.set_shared_memory_region(h_in, [x])
    await client.register_system_shared_memory(f"in-{tag}", k_in, x.nbytes)
    await client.register_system_shared_memory(f"out-{tag}", k_out, 80)
    result = await client.infer("mlp", [shm_input("input", x, "FP32", f"in-{tag}")],
                        outputs=[shm_output("logits", f"out-{tag}", 80)])
    out = result.get_output("logits")
    assert out["parameters"] == {"shared_memory_region": f"out-{tag}", "shared_memory_byte_size": 80}
    assert "data" not in out  # the data is in the region, not the body
    got = shm.get_contents_as_numpy(h_out, np.float32, out["shape"])
    np.testing.assert_array_equal(got, reference("mlp", {"input": x})["logits"])


async def test_register_status_unregister_as_triton(client: Any, regions: Regions) -> None:
    meta = await client.get_server_metadata()
    assert "system_shared_memory" in meta["extensions"] and "binary_tensor_data" in meta["extensions"]
    _, k1 = regions.create("a", 4096)
    _, k2 = regions.create("b", 4096)
    await client.register_system_shared_memory("a", k1, 1024, offset=512)
    await client.register_system_shared_memory("b", k2, 4096)
    status = await client.get_system_shared_memory_status()
    assert sorted(status, key=lambda r: r["name"]) == [
        {"name": "a", "key": k1, "offset": 512, "byte_size": 1024},
        {"name": "b", "key": k2, "offset": 0, "byte_size": 4096}]
    assert await client.get_system_shared_memory_status("b") == [
        {"name": "b", "key": k2, "offset": 0, "byte_size": 4096}]
    with pytest.raises(InferenceServerException, match="already registered"):
        await client.register_system_shared_memory("a", k1, 16)
    await client.unregister_system_shared_memory("a")
    await client.unregister_system_shared_memory("a")  # unknown names are fine, as in Triton
    with pytest.raises(InferenceServerException, match="'a' is not registered"):
        await client.get_system_shared_memory_status("a")
    await client.unregister_system_shared_memory()
    assert await client.get_system_shared_memory_status() == []


async def test_bad_registrations_are_refused(client: Any, regions: Regions, reference: Reference) -> None:
    _, key = regions.create("small", 64)
    cases = [
        ("r1", f"/outpost-missing-{uuid.uuid4().hex}", 16, 0, "does not exist"),
        ("r2", key, 65, 0, "is 64 bytes; region 'r2' needs"),
        ("r3", key, 64, 1, "needs offset 1 \\+ byte_size 64 = 65"),
        ("r4", "/../../etc/passwd", 16, 0, "must be one name"),
        ("r5", "/", 16, 0, "must be one name"),
        ("r6", key, 0, 0, "at least 1"),
    ]
    for name, k, size, offset, match in cases:
        with pytest.raises(InferenceServerException, match=match) as e:
            await client.register_system_shared_memory(name, k, size, offset=offset)
        assert e.value.status() == "400"
    # a symlink planted in the world-writable /dev/shm must not lead the server to a file elsewhere
    link = pathlib.Path("/dev/shm") / f"outpost-link-{uuid.uuid4().hex[:8]}"
    target = pathlib.Path(__file__)
    link.symlink_to(target)
    try:
        with pytest.raises(InferenceServerException, match="cannot be opened"):
            await client.register_system_shared_memory("r7", "/" + link.name, 16)
    finally:
        link.unlink()
    assert await client.get_system_shared_memory_status() == []
    await mlp_over_shm(client, regions, reference)


async def test_json_binary_and_shared_memory_mixed(client: Any, regions: Regions, reference: Reference) -> None:
    feats = RNG.standard_normal((3, 8)).astype(np.float32)
    ids = RNG.integers(0, 9, (3, 4)).astype(np.int64)
    want = reference("multi_io", {"features": feats, "ids": ids})
    # one region for both inputs (ids at an offset), one for both outputs
    h_in, k_in = regions.create("io-in", 1024)
    h_out, k_out = regions.create("io-out", 4096)
    shm.set_shared_memory_region(h_in, [feats])
    shm.set_shared_memory_region(h_in, [ids], offset=256)
    await client.register_system_shared_memory("io-in", k_in, 1024)
    await client.register_system_shared_memory("io-out", k_out, 4096)
    label_bytes = want["label"].nbytes
    scores_bytes = want["scores"].nbytes

    # features in shared memory, ids as JSON; scores into shared memory, label as binary
    r = await client.infer("multi_io",
                   [shm_input("features", feats, "FP32", "io-in"), data_input("ids", ids, "INT64", False)],
                   outputs=[shm_output("scores", "io-out", scores_bytes),
                            tritonhttp.InferRequestedOutput("label", binary_data=True)])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, want["scores"].shape),
                                  want["scores"])
    np.testing.assert_array_equal(r.as_numpy("label"), want["label"])

    # features as binary, ids from shared memory at an offset; label into shared memory at an offset, scores JSON
    r = await client.infer("multi_io",
                   [data_input("features", feats, "FP32", True), shm_input("ids", ids, "INT64", "io-in", 256)],
                   outputs=[tritonhttp.InferRequestedOutput("scores", binary_data=False),
                            shm_output("label", "io-out", label_bytes, 512)])
    np.testing.assert_array_equal(r.as_numpy("scores"), want["scores"])
    assert r.get_output("label")["parameters"]["shared_memory_offset"] == 512
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(h_out, want["label"].dtype, want["label"].shape, offset=512), want["label"])

    # an image: 602 KB that never crosses the socket
    img = RNG.standard_normal((1, 3, 224, 224)).astype(np.float32)
    h_img, k_img = regions.create("img", img.nbytes)
    shm.set_shared_memory_region(h_img, [img])
    await client.register_system_shared_memory("img", k_img, img.nbytes)
    r = await client.infer("cnn", [shm_input("image", img, "FP32", "img")],
                   outputs=[shm_output("logits", "io-out", 1000 * 4, 0)])
    np.testing.assert_allclose(shm.get_contents_as_numpy(h_out, np.float32, (1, 1000)),
                               reference("cnn", {"image": img})["logits"], rtol=1e-4, atol=1e-4)


async def test_bad_references_get_400_and_the_server_keeps_serving(client: Any, regions: Regions,
                                                                   reference: Reference) -> None:
    feats = RNG.standard_normal((2, 8)).astype(np.float32)
    ids = RNG.integers(0, 9, (2, 4)).astype(np.int64)
    h, key = regions.create("buf", 256)
    shm.set_shared_memory_region(h, [feats])
    await client.register_system_shared_memory("buf", key, 256)
    ids_json = data_input("ids", ids, "INT64", False)

    cases: list[tuple[str, list[Any], list[Any] | None]] = [
        ("'nowhere' is not registered", [shm_input("features", feats, "FP32", "nowhere"), ids_json], None),
        ("runs past the end of shared-memory region 'buf' \\(256 bytes\\)",
         [shm_input("features", feats, "FP32", "buf", offset=250), ids_json], None),
        ("binary data is 8 bytes; shape \\[2, 8\\] of FP32 needs 64", [
            _sized(tritonhttp.InferInput("features", [2, 8], "FP32"), "buf", 8), ids_json], None),
        ("outputs 'scores' and 'label' overlap in shared memory",
         [shm_input("features", feats, "FP32", "buf"), ids_json],
         [shm_output("scores", "buf", 64, 100), shm_output("label", "buf", 16, 120)]),
        ("output 'scores' is 24 bytes .* holds 8",
         [shm_input("features", feats, "FP32", "buf"), ids_json], [shm_output("scores", "buf", 8, 128)]),
        ("runs past the end", [shm_input("features", feats, "FP32", "buf"), ids_json],
         [shm_output("scores", "buf", 64, 200)]),
    ]
    for match, inputs, outputs in cases:
        await refused(client, match, "multi_io", inputs, outputs=outputs)
        await mlp_over_shm(client, regions, reference)


def _sized(i: tritonhttp.InferInput, region: str, byte_size: int) -> tritonhttp.InferInput:
    i.set_shared_memory(region, byte_size)
    return i


async def test_unlink_while_in_flight_keeps_the_mapping_then_400(served: Served, client: Any, regions: Regions,
                                                                  reference: Reference) -> None:
    img = RNG.standard_normal((1, 3, 224, 224)).astype(np.float32)
    h_img, k_img = regions.create("cam", img.nbytes)
    shm.set_shared_memory_region(h_img, [img])
    await client.register_system_shared_memory("cam", k_img, img.nbytes)
    blocker = RNG.standard_normal((16, 3, 224, 224)).astype(np.float32)
    busy = asyncio.ensure_future(client.infer("cnn", [data_input("image", blocker, "FP32", True)]))
    while served.dataplane.in_flight < 1:  # the engine is busy with the blocker for ~100 ms
        await asyncio.sleep(0.001)
    client2 = AsyncTriton(served.url, network_timeout=60)
    pending = asyncio.ensure_future(client2.infer("cnn", [shm_input("image", img, "FP32", "cam")]))
    while served.dataplane.in_flight < 2:  # decoded: its input views the server's mapping
        await asyncio.sleep(0.001)
    regions.destroy("cam")  # the client unmaps and unlinks while the request waits for the engine
    assert not os.path.exists("/dev/shm" + k_img)
    assert served.dataplane.in_flight == 2, "the request finished before the unlink; the test proved nothing"
    result = await pending
    np.testing.assert_allclose(result.as_numpy("logits"), reference("cnn", {"image": img})["logits"],
                               rtol=1e-4, atol=1e-4)
    await busy
    await refused(client2, "object .* was unlinked", "cnn", [shm_input("image", img, "FP32", "cam")])
    assert await client.get_system_shared_memory_status() == []  # dropped from the table
    await client2.aclose()
    await mlp_over_shm(client, regions, reference)


async def test_an_object_replaced_under_its_name_is_refused(client: Any, regions: Regions,
                                                             reference: Reference) -> None:
    x = RNG.standard_normal((1, 64)).astype(np.float32)
    h, key = regions.create("re", x.nbytes)
    shm.set_shared_memory_region(h, [x])
    await client.register_system_shared_memory("re", key, x.nbytes)
    path = pathlib.Path("/dev/shm" + key)
    path.unlink()
    path.write_bytes(x.tobytes())  # someone else's object, same name
    try:
        await refused(client, "replaced by another", "mlp", [shm_input("input", x, "FP32", "re")])
    finally:
        path.unlink()
        with contextlib.suppress(Exception):
            h._mpsm_handle.close()
        regions.handles.pop("re")
    await mlp_over_shm(client, regions, reference)


async def test_token_is_required_and_off_by_default(serve: ServeFactory, bundles: dict[str, pathlib.Path],
                                                   regions: Regions) -> None:
    guarded = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, token="s3cret", shared_memory=True))
    _, key = regions.create("t", 256)
    c = AsyncTriton(guarded.url)
    with pytest.raises(InferenceServerException, match="bearer token") as e:
        await c.register_system_shared_memory("t", key, 256)
    assert e.value.status() == "401"
    auth = {"Authorization": "Bearer s3cret"}
    await c.register_system_shared_memory("t", key, 256, headers=auth)
    assert [r["name"] for r in await c.get_system_shared_memory_status(headers=auth)] == ["t"]
    await c.aclose()

    plain = await serve([bundles["mlp"]], server_config=ServerConfig(port=0))
    c = AsyncTriton(plain.url)
    assert "system_shared_memory" not in (await c.get_server_metadata())["extensions"]
    with pytest.raises(InferenceServerException, match="--shared-memory") as e:
        await c.register_system_shared_memory("t", key, 256)
    assert e.value.status() == "404"
    x = np.zeros((1, 64), np.float32)
    await refused(c, "--shared-memory", "mlp", [shm_input("input", x, "FP32", "t")])
    await refused(c, "--shared-memory", "mlp", [data_input("input", x, "FP32", True)],
                  outputs=[shm_output("logits", "t", 40)])
    await c.aclose()


def test_regions_belong_to_their_owner_and_inputs_are_read_only(regions: Regions) -> None:
    h, key = regions.create("own", 256)
    shm.set_shared_memory_region(h, [np.arange(64, dtype=np.float32)])
    table = RegionTable()
    try:
        table.register("alice", "own", {"key": key, "offset": 0, "byte_size": 256})
        with pytest.raises(RegionError, match="not registered"):
            table.get("bob", "own")
        table.unregister("bob")  # another owner's unregister-all leaves alice's region alone
        assert table.status("bob") == [] and len(table.status("alice")) == 1
        body = (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],'
                b'"parameters":{"shared_memory_region":"own","shared_memory_byte_size":256}}]}')
        req = decode_request(body, None, ClientRegions(table, "alice").input_view)
        arr = req.inputs[0].data
        np.testing.assert_array_equal(arr.ravel(), np.arange(64, dtype=np.float32))
        assert not arr.flags.writeable and not arr.flags.owndata  # a view of the read-only mapping
        with pytest.raises(TypeError):
            table.get("alice", "own").readable[0:1] = b"x"
        with pytest.raises(RegionError, match="not registered"):
            decode_request(body, None, ClientRegions(table, "bob").input_view)
        del req, arr
    finally:
        table.close()


async def test_outpost_serve_shared_memory_flag(bundles: dict[str, pathlib.Path],
                                                keypair: tuple[pathlib.Path, pathlib.Path],
                                                regions: Regions, reference: Reference) -> None:
    p = ServeProcess(str(bundles["mlp"]), "--trust", str(keypair[1]), "--shared-memory")
    try:
        await asyncio.to_thread(p.wait_ready)
        c = AsyncTriton(p.url)
        assert "system_shared_memory" in (await c.get_server_metadata())["extensions"]
        await mlp_over_shm(c, regions, reference)
        await c.aclose()
    finally:
        code, err = await asyncio.to_thread(p.stop)
    assert code == 0, err
