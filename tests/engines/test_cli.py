"""`outpost engine build|inspect|bench` and `outpost doctor`, through the real entry point."""

from __future__ import annotations

import json
import pathlib

import pytest

from cli.main import main
from engines import HardwareInfo
from tests.conftest import MakeBundle


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_doctor_says_what_this_machine_has(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "doctor")
    assert code == 0
    for field in ("cpu:", "gpu", "driver:", "cuda:", "tensorrt:", "onnxruntime:", "probe source:"):
        assert field in out
    code, out, _ = _run(capsys, "doctor", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["cpu_count"] >= 1 and "CPUExecutionProvider" in doc["ort_providers"]


def test_inspect_shows_the_plan_and_the_reasons(capsys: pytest.CaptureFixture[str], make_bundle: MakeBundle,
                                                keypair: tuple[pathlib.Path, pathlib.Path],
                                                cache_dir: pathlib.Path) -> None:
    path = make_bundle("dynamic_conv")
    code, out, err = _run(capsys, "engine", "inspect", str(path), "--trust", str(keypair[1]), "--cache",
                          str(cache_dir), "--json")
    assert code == 0 and "NOT signature-checked" not in err
    doc = json.loads(out)
    assert doc["try"][-1]["backend"] == "ort-cpu" and doc["try"][-1]["cached"] is False
    assert ["batch", 1, 8, 32] in doc["profile"]
    code, out, _ = _run(capsys, "engine", "inspect", str(path), "--trust", str(keypair[1]), "--cache", str(cache_dir))
    assert "ort-cpu: needs a build" in out and "shape profile: batch=1..8..32" in out


def test_build_then_cache_hit(capsys: pytest.CaptureFixture[str], make_bundle: MakeBundle,
                              keypair: tuple[pathlib.Path, pathlib.Path], cache_dir: pathlib.Path) -> None:
    path = make_bundle("mlp")
    args = ("engine", "build", str(path), "--trust", str(keypair[1]), "--cache", str(cache_dir),
            "--backend", "ort-cpu")
    code, out, _ = _run(capsys, *args)
    assert code == 0 and "ort-cpu engine, built, parity checked" in out
    code, out, _ = _run(capsys, *args, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["cache_hit"] is True and doc["backend"] == "ort-cpu"


def test_unsigned_bundle_works_with_a_loud_warning(capsys: pytest.CaptureFixture[str], make_bundle: MakeBundle,
                                                   cache_dir: pathlib.Path) -> None:
    path = make_bundle("mlp", sign=False)
    code, _, err = _run(capsys, "engine", "inspect", str(path), "--cache", str(cache_dir))
    assert code == 0 and "WARNING" in err and "NOT signature-checked" in err


def test_bundle_from_an_untrusted_key_is_refused(capsys: pytest.CaptureFixture[str], make_bundle: MakeBundle,
                                                  other_keypair: tuple[pathlib.Path, pathlib.Path],
                                                  cache_dir: pathlib.Path) -> None:
    path = make_bundle("mlp")
    code, _, err = _run(capsys, "engine", "build", str(path), "--trust", str(other_keypair[1]), "--cache",
                        str(cache_dir))
    assert code == 1 and err.startswith("error:")
    assert not (cache_dir / "entries").exists() or list((cache_dir / "entries").iterdir()) == []


def test_unavailable_backend_is_a_one_line_error(capsys: pytest.CaptureFixture[str], make_bundle: MakeBundle,
                                                 cache_dir: pathlib.Path, real_hardware: HardwareInfo) -> None:
    if real_hardware.gpu is not None:
        pytest.skip("this machine has a GPU")
    path = make_bundle("mlp", sign=False)
    code, _, err = _run(capsys, "engine", "build", str(path), "--backend", "tensorrt", "--cache", str(cache_dir))
    assert code == 1
    assert "error: backend tensorrt cannot run here: no NVIDIA GPU detected" in err


def test_bench_reports_engine_and_bare_ort_side_by_side(capsys: pytest.CaptureFixture[str], make_bundle: MakeBundle,
                                                        cache_dir: pathlib.Path) -> None:
    path = make_bundle("mlp", sign=False)
    code, out, _ = _run(capsys, "engine", "bench", str(path), "--cache", str(cache_dir), "--batch", "1,4",
                        "--iterations", "20", "--warmup", "2", "--threads", "1", "--backend", "ort-cpu", "--json")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(r["p50_ms"] > 0 and r["baseline_p50_ms"] > 0 and r["ratio"] > 0 for r in rows)
    code, out, _ = _run(capsys, "engine", "bench", str(path), "--cache", str(cache_dir), "--batch", "0")
    assert code == 2


def test_a_model_that_rejects_synthesized_inputs_builds_and_says_parity_was_not_checked(
        capsys: pytest.CaptureFixture[str], keypair: tuple[pathlib.Path, pathlib.Path], cache_dir: pathlib.Path,
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    import bundle
    from tests.models.quirks import STFT_LONG_PAD, write_quirks

    model = write_quirks(tmp_path / "q")["stft_long"]
    path = tmp_path / "b"
    bundle.build([model], path, bundle.BuildOptions(name="audio", version="1.0.0"))
    bundle.sign_directory(path, keypair[0])
    common = (str(path), "--trust", str(keypair[1]), "--cache", str(cache_dir), "--backend", "ort-cpu")
    with caplog.at_level("WARNING", logger="engines.pipeline"):
        code, out, _ = _run(capsys, "engine", "build", *common)
    assert code == 0, out
    assert "ort-cpu engine, built, parity NOT checked" in out
    assert "not checked: the model rejected synthesized inputs (" in out and f"pre-pad ({STFT_LONG_PAD})" in out
    assert "add sample inputs with `--samples`" in out
    assert any("not checked: the model rejected synthesized inputs" in r.getMessage() for r in caplog.records)
    code, out, _ = _run(capsys, "engine", "inspect", *common)
    assert code == 0 and "ort-cpu: cached" in out and "parity not checked: the model rejected synthesized" in out
    code, out, _ = _run(capsys, "engine", "inspect", *common, "--json")
    assert "not checked" in json.loads(out)["try"][0]["parity_note"]
