"""The inference routes' fast dispatch (agent.http_server._fast_infer) answers exactly as the router does.

Plain `/v2/models/{model}[/versions/{version}]/infer` POSTs skip aiohttp's router and
middleware chain; anything else (a query, a percent-escape, another method) goes through
them. Both ways must give the same answer, the same bearer-token check, and a JSON 500 for
a bug, after which the server keeps serving.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import orjson
import pytest
import yarl

from agent import ServerConfig
from tests.agent.conftest import ServeFactory
from tests.agent.test_http_bad_input import GOOD, X, _assert_exact


def _paths(version: str) -> list[str]:
    return ["/v2/models/mlp/infer",  # fast
            f"/v2/models/mlp/versions/{version}/infer",  # fast
            "/v2/models/mlp/infer?trace=1",  # router (a query)
            "/v2/models/%6Dlp/infer",  # router (a percent-escape, decoded by it)
            f"/v2/models/%6Dlp/versions/{version}/infer"]


async def _post(served: Any, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    url = yarl.URL(served.url + path, encoded=True)
    async with served.session.post(url, data=orjson.dumps({"inputs": GOOD}),
                                   headers={"Content-Type": "application/json", **(headers or {})}) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


async def test_fast_and_routed_inference_answer_alike(serve: ServeFactory, bundles: dict[str, pathlib.Path],
                                                      reference: Any) -> None:
    served = await serve([bundles["mlp"]])
    version = served.dataplane.models()[0].version
    want = reference("mlp", {"input": X})["logits"]
    for path in _paths(version):
        status, _, doc = await _post(served, path)
        assert status == 200, (path, doc)
        got = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(doc["outputs"][0]["shape"])
        np.testing.assert_array_equal(got, want, err_msg=path)
    status, _, doc = await _post(served, "/v2/models/nope/infer")
    assert status == 404 and "nope" in doc["error"]
    status, _, doc = await _post(served, "/v2/models/mlp/versions/9.9.9/infer")
    assert status == 404 and "9.9.9" in doc["error"]
    assert served.dataplane.models()[0].metrics.requests == len(_paths(version))  # 404s are refused before it


async def test_bearer_token_on_both_ways(serve: ServeFactory, bundles: dict[str, pathlib.Path]) -> None:
    served = await serve([bundles["mlp"]], server_config=ServerConfig(port=0, token="s3cret"))
    version = served.dataplane.models()[0].version
    for path in _paths(version):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, got, doc = await _post(served, path, headers)
            assert status == 401 and got["WWW-Authenticate"].startswith("Bearer") and "token" in doc["error"], path
        status, _, doc = await _post(served, path, {"Authorization": "Bearer s3cret"})
        assert status == 200, (path, doc)


async def test_a_bug_is_a_json_500_on_both_ways(serve: ServeFactory, bundles: dict[str, pathlib.Path],
                                                reference: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    served = await serve([bundles["mlp"]])
    version = served.dataplane.models()[0].version

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    with monkeypatch.context() as m:
        m.setattr(served.dataplane, "infer", broken)
        for path in _paths(version):
            status, got, doc = await _post(served, path)
            assert status == 500 and got["Content-Type"].startswith("application/json"), path
            assert doc["error"] == "internal error: RuntimeError"
    await _assert_exact(served, reference)
