"""The engine cache: keys, atomic commits, corruption, other hardware, LRU, locking between processes."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

import bundle
from engines import CacheKey, EngineCache, StaticProbe, open_engine
from engines.cache import ENTRY_META
from tests.conftest import MakeBundle

KEY = CacheKey(model_sha256="a" * 64, backend="ort-cpu", precision="fp32", profile=(("batch", 1, 8, 32),),
               options='{"graph_optimization": "all"}', gpu=None, compute_capability=None,
               runtimes=(("onnxruntime", "1.31.1"),))


def _commit(cache: EngineCache, key: CacheKey, payload: bytes = b"engine bytes", size: int = 0) -> pathlib.Path:
    with cache.lock(key), cache.staging(key) as staging:
        (staging / "model.onnx").write_bytes(payload + b"\0" * size)
        return cache.commit(staging, key, {"note": "test"}, built_from={"m.onnx": key.model_sha256})


@pytest.mark.parametrize("change", [
    {"model_sha256": "b" * 64}, {"backend": "ort-cuda"}, {"precision": "fp16"},
    {"profile": (("batch", 1, 8, 64),)}, {"options": '{"graph_optimization": "basic"}'},
    {"gpu": "NVIDIA A10G"}, {"compute_capability": "8.6"}, {"runtimes": (("onnxruntime", "1.32.0"),)},
])
def test_every_key_field_selects_a_different_entry(change: dict[str, object]) -> None:
    other = dataclasses.replace(KEY, **change)  # type: ignore[arg-type]
    assert other.name != KEY.name and other.digest != KEY.digest


def test_commit_then_lookup_verifies_every_file(tmp_path: pathlib.Path) -> None:
    cache = EngineCache(tmp_path)
    path = _commit(cache, KEY)
    found = cache.lookup(KEY)
    assert found.hit and found.path == path
    meta = json.loads((path / ENTRY_META).read_text())
    assert meta["key"] == KEY.to_dict()
    assert set(meta["files"]) == {"model.onnx"}
    assert list((tmp_path / "staging").iterdir()) == []


def test_absent_entry_is_a_plain_miss(tmp_path: pathlib.Path) -> None:
    found = EngineCache(tmp_path).lookup(KEY)
    assert not found.hit and found.reason is None


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda p: p.write_bytes(b"engine bytEs"), "corrupted"),
    (lambda p: p.write_bytes(b"engine"), "truncated"),
    (lambda p: p.unlink(), "missing"),
    (lambda p: (p.parent / ENTRY_META).unlink(), "no readable entry.json"),
    (lambda p: (p.parent / ENTRY_META).write_text("{not json"), "no readable entry.json"),
])
def test_damaged_entry_is_a_miss_with_the_reason(tmp_path: pathlib.Path, damage, reason: str) -> None:  # type: ignore[no-untyped-def]
    cache = EngineCache(tmp_path)
    path = _commit(cache, KEY)
    damage(path / "model.onnx")
    found = cache.lookup(KEY)
    assert not found.hit
    assert reason in (found.reason or "")


def test_entry_made_for_other_hardware_is_never_loaded(tmp_path: pathlib.Path) -> None:
    cache = EngineCache(tmp_path)
    other = dataclasses.replace(KEY, gpu="NVIDIA A10G", compute_capability="8.6")
    made_elsewhere = _commit(cache, other)
    # copied or renamed into the place of this machine's key: the stored key still says where it came from
    shutil.copytree(made_elsewhere, cache.entry_path(KEY))
    found = cache.lookup(KEY)
    assert not found.hit
    assert "built for another compute_capability, gpu" in (found.reason or "")


def test_lru_eviction_keeps_the_cache_under_its_bound(tmp_path: pathlib.Path) -> None:
    cache = EngineCache(tmp_path, max_bytes=10_000)
    keys = [dataclasses.replace(KEY, model_sha256=c * 64) for c in "abcd"]
    for i, k in enumerate(keys):
        path = _commit(cache, k, size=4_000)
        os.utime(path / ENTRY_META, (time.time() - 100 + i, time.time() - 100 + i))
    cache.touch(cache.entry_path(keys[0]))  # used just now: the most recent
    removed = cache.evict(keep=keys[3])
    assert removed == [keys[1].name, keys[2].name]
    assert cache.total_bytes() <= 10_000
    assert cache.lookup(keys[0]).hit and cache.lookup(keys[3]).hit


def test_eviction_leaves_an_entry_being_rebuilt_alone(tmp_path: pathlib.Path) -> None:
    cache = EngineCache(tmp_path, max_bytes=1)
    _commit(cache, KEY, size=100)
    with cache.lock(KEY, timeout_s=0):
        assert cache.evict() == []
    assert cache.evict() == [KEY.name]


def test_stale_staging_of_a_killed_build_is_cleaned_and_never_loaded(tmp_path: pathlib.Path) -> None:
    cache = EngineCache(tmp_path)
    stale = tmp_path / "staging" / f"{KEY.name}.abc123"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half an engi")
    assert not cache.lookup(KEY).hit
    other = dataclasses.replace(KEY, backend="ort-cuda")
    busy = tmp_path / "staging" / f"{other.name}.def456"
    busy.mkdir()
    with cache.lock(other, timeout_s=0):  # a build in progress in another process
        cache.evict()
    assert not stale.exists() and busy.exists()


def test_failed_build_leaves_no_staging(tmp_path: pathlib.Path) -> None:
    cache = EngineCache(tmp_path)
    with pytest.raises(RuntimeError), cache.staging(KEY) as staging:
        (staging / "model.onnx").write_bytes(b"x")
        raise RuntimeError("builder died")
    assert list((tmp_path / "staging").iterdir()) == []
    assert not cache.lookup(KEY).hit


# -- through open_engine ------------------------------------------------------------------------------


def test_cache_hit_skips_build_and_parity(make_bundle: MakeBundle, cpu_probe: StaticProbe,
                                         cache_dir: pathlib.Path) -> None:
    b = bundle.load_unverified(make_bundle("big", sign=False))
    cold = open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    warm = open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    try:
        assert not cold.cache_hit and cold.build is not None and "parity" in cold.build
        assert warm.cache_hit and warm.build is None
        feeds = {"input": __import__("numpy").ones((1, 1024), dtype="float32")}
        assert (cold.engine.infer(feeds)["logits"] == warm.engine.infer(feeds)["logits"]).all()
    finally:
        cold.engine.close()
        warm.engine.close()


def test_corrupted_entry_is_rebuilt(make_bundle: MakeBundle, cpu_probe: StaticProbe, cache_dir: pathlib.Path) -> None:
    b = bundle.load_unverified(make_bundle("mlp", sign=False))
    open_engine(b, cache_dir=cache_dir, probe=cpu_probe).engine.close()
    (entry,) = (cache_dir / "entries").iterdir()
    weights = entry / "model.onnx.data"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    again.engine.close()
    assert not again.cache_hit
    assert again.build is not None and "corrupted" in again.build["replaced_entry"]
    third = open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    third.engine.close()
    assert third.cache_hit


def test_other_cpu_or_runtime_builds_its_own_entry(make_bundle: MakeBundle, cpu_probe: StaticProbe,
                                                  cache_dir: pathlib.Path) -> None:
    b = bundle.load_unverified(make_bundle("mlp", sign=False))
    open_engine(b, cache_dir=cache_dir, probe=cpu_probe).engine.close()
    upgraded = StaticProbe(dataclasses.replace(cpu_probe.detect(), onnxruntime_version="99.0.0"))
    result = open_engine(b, cache_dir=cache_dir, probe=upgraded)
    result.engine.close()
    assert not result.cache_hit
    assert len(list((cache_dir / "entries").iterdir())) == 2


_RACER = """
import sys, bundle, engines
b = bundle.load_unverified(sys.argv[1])
r = engines.open_engine(b, cache_dir=sys.argv[2])
print("HIT" if r.cache_hit else "BUILT")
"""


def test_two_processes_never_build_the_same_entry(make_bundle: MakeBundle, cache_dir: pathlib.Path) -> None:
    path = make_bundle("dynamic_conv", sign=False)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(path), str(cache_dir)], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outcomes = sorted(p.communicate(timeout=100)[0].strip() for p in procs)
    assert outcomes == ["BUILT", "HIT"]
    assert len(list((cache_dir / "entries").iterdir())) == 1


def test_kill_9_during_a_build_never_leaves_a_loadable_half_entry(make_bundle: MakeBundle, cpu_probe: StaticProbe,
                                                                 cache_dir: pathlib.Path) -> None:
    """THREATS #18: the builder and its child die together mid-build (power cut); the next start rebuilds."""
    import signal

    path = make_bundle("big", sign=False)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _RACER, str(path), str(cache_dir)], stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any((cache_dir / "staging").glob("*/*")):
        time.sleep(0.005)  # wait until the build has started writing
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert list((cache_dir / "entries").iterdir()) == []  # the commit never happened
    b = bundle.load_unverified(path)
    result = open_engine(b, cache_dir=cache_dir, probe=cpu_probe)
    result.engine.close()
    assert not result.cache_hit
    assert [p.name for p in (cache_dir / "staging").iterdir()] == []  # the dead build's staging is gone
