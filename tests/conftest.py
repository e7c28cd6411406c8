"""Fixtures shared by every test package: real ONNX models, real keys, real signed bundles."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator, Sequence

import pytest

import bundle
from tests.models.make_models import write_all

MakeBundle = Callable[..., pathlib.Path]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run where a CUDA GPU is detected, and say why they did not run elsewhere."""
    gpu_items = [i for i in items if i.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    from engines import SystemProbe

    if SystemProbe().detect().gpu is None:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run bench/gpu_check.sh on a GPU machine)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def private_engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """Tests never build engines into the user's own cache: the default cache is a session directory."""
    path = tmp_path_factory.mktemp("engine-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OUTPOST_ENGINE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("models")
    write_all(out)
    return out


@pytest.fixture(scope="session")
def model_paths(models_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    paths = {p.stem: p for p in models_dir.glob("*.onnx")}
    paths["external"] = models_dir / "external" / "external.onnx"
    return paths


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """(private key, public key) trusted by the tests."""
    return bundle.generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """A valid key pair that nobody trusts."""
    return bundle.generate_keys(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture
def make_bundle(tmp_path: pathlib.Path, model_paths: dict[str, pathlib.Path],
                keypair: tuple[pathlib.Path, pathlib.Path]) -> MakeBundle:
    """Build and sign a bundle: make_bundle("mlp", name=..., version=..., sign=True, **BuildOptions)."""
    counter = iter(range(1_000_000))

    def make(*models: str, name: str = "demo", version: str = "1.0.0", sign: bool = True,
             key: pathlib.Path | None = None, out: pathlib.Path | None = None, **opts: object) -> pathlib.Path:
        chosen: Sequence[str] = models or ("mlp",)
        dest = out or tmp_path / f"bundle-{name}-{version}-{next(counter)}"
        bundle.build([model_paths[m] for m in chosen], dest,
                     bundle.BuildOptions(name=name, version=version, **opts))  # type: ignore[arg-type]
        if sign:
            bundle.sign_directory(dest, key or keypair[0])
        return dest

    return make


@pytest.fixture
def trust(keypair: tuple[pathlib.Path, pathlib.Path]) -> list[bundle.TrustAnchor]:
    return bundle.anchors([keypair[1]])
