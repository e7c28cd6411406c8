"""THREATS #12: an engine is built and loaded only from bytes whose hash verification vouched for.

The attack: swap a bundle's model file after `verify` (anyone who can write
the bundle directory can). Before the fix, the build child re-read the path,
parity compared the swapped model against itself, and the engine cache kept
it under the genuine digest across restarts.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading

import numpy as np
import onnxruntime as ort
import pytest

import bundle
from engines import EngineCache, StaticProbe, open_engine, plan
from engines.errors import ModelChanged
from tests.conftest import MakeBundle
from tests.models.make_models import mlp

X = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)


def _ort(model: bytes | pathlib.Path) -> np.ndarray:
    src = model if isinstance(model, bytes) else str(model)
    return np.asarray(ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"input": X})[0])


def _swap(path: pathlib.Path, data: bytes) -> None:
    """Replace the file's content in one rename, as an attacker with write access to the bundle would."""
    tmp = path.with_suffix(".swap")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture
def signed(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> tuple[bundle.VerifiedBundle, bytes, bytes]:
    vb = bundle.verify(make_bundle("mlp"), trust)
    genuine = vb.model_path().read_bytes()
    evil = mlp(seed=99).SerializeToString()  # same signature, other weights: serves, answers differently
    assert not np.allclose(_ort(genuine), _ort(evil))
    return vb, genuine, evil


def test_a_model_swapped_after_verification_is_never_built_nor_cached(
        signed: tuple[bundle.VerifiedBundle, bytes, bytes], cpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    vb, genuine, evil = signed
    _swap(vb.model_path(), evil)
    with pytest.raises(ModelChanged, match="changed after the bundle was verified"):
        open_engine(vb, cache_dir=cache_dir, probe=cpu_probe)
    assert list((cache_dir / "entries").iterdir()) == []  # nothing of the swapped model was kept

    _swap(vb.model_path(), genuine)  # restored: the genuine model is built and served, also after a "restart"
    for _ in range(2):
        result = open_engine(vb, cache_dir=cache_dir, probe=cpu_probe)
        with result.engine as engine:
            np.testing.assert_allclose(engine.infer({"input": X})["logits"], _ort(genuine), rtol=1e-5, atol=1e-6)
    assert result.cache_hit
    (entry,) = (cache_dir / "entries").iterdir()
    meta = json.loads((entry / "entry.json").read_text())
    assert meta["built_from"] == {vb.manifest.model().file: vb.manifest.model().sha256}


def test_a_swap_during_the_build_is_refused_or_has_no_effect(
        signed: tuple[bundle.VerifiedBundle, bytes, bytes], cpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    """The file is swapped as soon as the build's private copy appears: whichever side of the copy the
    swap lands on, the swapped model is never what serves, and never what the cache holds."""
    vb, genuine, evil = signed
    staging = cache_dir / "staging"
    done = threading.Event()

    def swap_when_the_build_starts() -> None:
        while not done.is_set():
            if staging.is_dir() and any(".src." in p.name for p in staging.iterdir()):
                _swap(vb.model_path(), evil)
                return
            done.wait(0.0005)

    t = threading.Thread(target=swap_when_the_build_starts)
    t.start()
    try:
        result = open_engine(vb, cache_dir=cache_dir, probe=cpu_probe)
    except ModelChanged:
        assert list((cache_dir / "entries").iterdir()) == []
    else:
        with result.engine as engine:
            np.testing.assert_allclose(engine.infer({"input": X})["logits"], _ort(genuine), rtol=1e-5, atol=1e-6)
    finally:
        done.set()
        t.join()
    assert vb.model_path().read_bytes() == evil  # the swap did happen
    for entry in (cache_dir / "entries").iterdir():  # whatever was cached came from the genuine bytes
        assert json.loads((entry / "entry.json").read_text())["built_from"] == {
            vb.manifest.model().file: vb.manifest.model().sha256}


def test_an_entry_not_built_from_the_verified_bytes_is_never_loaded(
        make_bundle: MakeBundle, trust: list[bundle.TrustAnchor], cpu_probe: StaticProbe,
        cache_dir: pathlib.Path) -> None:
    vb = bundle.verify(make_bundle("mlp"), trust)
    open_engine(vb, cache_dir=cache_dir, probe=cpu_probe).engine.close()
    (entry,) = (cache_dir / "entries").iterdir()
    meta_path = entry / "entry.json"
    meta = json.loads(meta_path.read_text())
    meta["built_from"] = {vb.manifest.model().file: "0" * 64}  # an entry from a pre-fix build of other bytes
    meta_path.write_text(json.dumps(meta))
    step = plan(vb, cache_dir=EngineCache(cache_dir), probe=cpu_probe).steps[0]
    assert step.cached is False and "verified bytes" in str(step.cache_note)
    rebuilt = open_engine(vb, cache_dir=cache_dir, probe=cpu_probe)
    rebuilt.engine.close()
    assert not rebuilt.cache_hit


def test_external_data_is_copied_checked_and_in_the_cache_key(make_bundle: MakeBundle, cpu_probe: StaticProbe,
                                                                cache_dir: pathlib.Path) -> None:
    vb = bundle.load_unverified(make_bundle("external", sign=False))
    sources = vb.model_sources()
    assert len(sources) == 2 and sources[0][0] == vb.manifest.model().file
    key = plan(vb, cache_dir=cache_dir, probe=cpu_probe).steps[0].key
    assert key.data_sha256 == (sources[1][1],)
    data = vb.root / sources[1][0]
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))  # weights changed after the check, graph untouched
    with pytest.raises(ModelChanged):
        open_engine(vb, cache_dir=cache_dir, probe=cpu_probe)
