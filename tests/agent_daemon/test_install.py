"""Installs without a fleet: a model file swapped during the build is never served; air-gapped import."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

from agent.daemon.agent import assemble
from agent.daemon.config import load
from agent.daemon.errors import UpdateRefused
from agent.runner import EngineSource
from bundle import VerifiedBundle
from engines import EngineCache, EngineOptions, EngineResult, Probe, open_engine
from tests.agent_daemon.conftest import Version
from tests.agent_daemon.harness import OUTPOST, REPO
from tests.models.make_models import mlp


def _config(root: pathlib.Path, trust: pathlib.Path) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "agent.toml"
    path.write_text(f'[agent]\nstate_dir = "state"\ncredential = "none.json"\ntrust = ["{trust}"]\n'
                    '[update]\nhealth_runs = 2\ndisk_margin_bytes = 0\n[model]\nthreads = 1\n')
    return path


async def test_model_swapped_during_build_is_never_served_nor_cached(
        tmp_path: pathlib.Path, versions: dict[str, Version], keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    config = load(_config(tmp_path, keypair[1]))
    parts = assemble(config)
    other = mlp(seed=77).SerializeToString()

    def swap_then_build(bundle: VerifiedBundle, model: str | None = None, backend: str = "auto",
                        options: EngineOptions | None = None,
                        cache_dir: str | os.PathLike[str] | EngineCache | None = None,
                        probe: Probe | None = None) -> EngineResult:
        path = bundle.model_path(model)
        os.chmod(path, 0o644)  # what an attacker with the agent's uid would have to do first
        path.write_bytes(other)
        return open_engine(bundle, model, backend, options, cache_dir, probe)

    parts.dataplane.engines = EngineSource(factory=swap_then_build, cache_dir=config.engine_cache_dir)
    with pytest.raises(UpdateRefused) as refused:
        await parts.updater.import_archive(versions["v1"].archive)
    # The engines package refuses the swapped bytes as it copies them (ModelChanged); the updater's
    # own re-hash after the build is the second line, for a file swapped and swapped back.
    assert refused.value.step == "build" and "ModelChanged" in refused.value.reason
    assert "changed after the bundle was verified" in refused.value.reason
    assert parts.dataplane.models() == [] and parts.store.load("demo").active is None
    entries = config.engine_cache_dir / "entries"
    assert not entries.exists() or not any(entries.iterdir()), "an engine built from swapped bytes stayed cached"
    assert parts.store.load("demo").refused  # those exact bytes are not tried again
    await parts.dataplane.close()


def _outpost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OUTPOST, *args], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_air_gapped_import_verifies_checks_the_floor_and_shows_in_status(
        tmp_path: pathlib.Path, versions: dict[str, Version], keypair: tuple[pathlib.Path, pathlib.Path],
        other_keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    config = _config(tmp_path, keypair[1])
    ok = _outpost("agent", "import", "--config", str(config), str(versions["v1"].archive))
    assert ok.returncode == 0, ok.stderr
    assert "imported demo@1.0.0" in ok.stdout
    status = json.loads(_outpost("agent", "status", "--config", str(config), "--json").stdout)
    (rec,) = status["bundles"]
    assert rec["active"] == "1.0.0" and rec["floor"] == 2
    assert status["models"]["demo"]["backend"] == "ort-cpu"
    # read-only copy
    install = next((tmp_path / "state" / "installs" / "demo").iterdir())
    assert all(oct(p.stat().st_mode & 0o777) == "0o444" for p in install.rglob("*") if p.is_file())

    below = _outpost("agent", "import", "--config", str(config), str(versions["old"].archive))
    assert below.returncode == 1 and "anti-rollback floor 2" in below.stderr

    # signed by a key this device does not trust
    foreign_dir = tmp_path / "foreign"
    import bundle
    bundle.build([versions["v2"].model], foreign_dir, bundle.BuildOptions(name="demo", version="9.0.0", release=3))
    bundle.sign_directory(foreign_dir, other_keypair[0])
    foreign = bundle.pack(foreign_dir, tmp_path / "foreign.tar")
    refused = _outpost("agent", "import", "--config", str(config), str(foreign))
    assert refused.returncode == 1 and "verify" in refused.stderr
    human = _outpost("agent", "status", "--config", str(config))
    assert "bundle demo: active 1.0.0" in human.stdout and "model demo@1.0.0: engine ort-cpu" in human.stdout
