"""One model that does not load never takes the others down: `serve A B C` serves what loads,
reports the rest (log, ready 503, the reason in the metadata), and fails only when nothing loads."""

from __future__ import annotations

import json
import pathlib
import urllib.error
import urllib.request

import pytest

import bundle
from agent import DataPlane, ModelConfig
from agent.runner import EngineSource
from engines.errors import ModelChanged
from tests.agent.test_serve_cli import ServeProcess
from tests.conftest import MakeBundle
from tests.models.make_models import mlp

pytestmark = pytest.mark.timeout(120)


def _get(url: str) -> tuple[int, dict[str, object] | None]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read()
            return r.status, json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        return e.code, None


def _post(url: str, doc: dict[str, object]) -> int:
    req = urllib.request.Request(url, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return int(r.status)


def test_serve_serves_what_loads_and_reports_the_model_that_did_not(
        make_bundle: MakeBundle, keypair: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    good_a = make_bundle("mlp", name="mlp")
    broken = make_bundle("unknown_op", name="broken")  # valid ONNX no runtime can load
    good_b = make_bundle("multi_io", name="multi")
    monkeypatch.setenv("OUTPOST_ENGINE_CACHE", str(tmp_path / "ec"))
    p = ServeProcess(str(good_a), str(broken), str(good_b), "--trust", str(keypair[1]))
    try:
        p.wait_ready(60)
        base = f"http://{p.url}"
        assert _get(f"{base}/v2/health/ready")[0] == 200  # every *loaded* model is ready
        assert _get(f"{base}/v2/models/mlp/ready")[0] == 200
        assert _get(f"{base}/v2/models/multi/ready")[0] == 200
        assert _get(f"{base}/v2/models/broken/ready")[0] == 503
        assert _get(f"{base}/v2/models/nobody/ready")[0] == 404
        status, meta = _get(f"{base}/v2/models/broken")
        assert status == 200 and meta is not None
        outpost = meta["outpost"]
        assert isinstance(outpost, dict) and outpost["ready"] is False and outpost["state"] == "failed"
        assert "no engine could be built" in str(outpost["error"])
        doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
        assert _post(f"{base}/v2/models/mlp/infer", doc) == 200
    finally:
        code, err = p.stop()
    assert code == 0, err
    assert "NOT serving broken@1.0.0" in err and "no engine could be built" in err


def test_serve_fails_when_no_model_loads(make_bundle: MakeBundle, keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    p = ServeProcess(str(make_bundle("unknown_op", name="broken")), "--trust", str(keypair[1]))
    assert p.proc.wait(60) == 1
    _, err = p.stop()
    assert "NOT serving broken@1.0.0" in err and "no model could be loaded" in err


def test_serving_a_swapped_bundle_serves_the_others_and_reports_it(
        make_bundle: MakeBundle, trust: list[bundle.TrustAnchor], tmp_path: pathlib.Path) -> None:
    good = bundle.verify(make_bundle("multi_io", name="good"), trust)
    victim = bundle.verify(make_bundle("mlp", name="victim"), trust)
    victim.model_path().write_bytes(mlp(seed=99).SerializeToString())  # swapped after verification
    dp = DataPlane(engines=EngineSource(cache_dir=str(tmp_path / "ec")))
    dp.load_bundle(good, ModelConfig())
    with pytest.raises(ModelChanged) as err:
        dp.load_bundle(victim, ModelConfig())
    dp.record_failure(victim, err.value)
    assert [sm.name for sm in dp.models()] == ["good"]
    assert dp.model_ready("victim") is False and dp.server_ready()
    meta = dp.model_metadata("victim")["outpost"]
    assert meta["ready"] is False and "changed after the bundle was verified" in meta["error"]
