"""build -> sign -> pack -> unpack -> verify on real models, and interop with `model_signing`."""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import bundle
from bundle import errors
from tests.conftest import MakeBundle

MODEL_SIGNING = [sys.executable, "-m", "model_signing"]


@pytest.mark.parametrize("models", [("multi_io",), ("dynamic_conv",), ("big",), ("mlp", "types", "fp16")],
                         ids=["multi-io", "dynamic-dims", "several-MB", "three-models"])
def test_round_trip(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor], tmp_path: pathlib.Path,
                    model_paths: dict[str, pathlib.Path], models: tuple[str, ...]) -> None:
    src = make_bundle(*models, name="rt", version="2.1.0-rc.1+build.5", release=7)
    archive = tmp_path / "rt.tar"
    bundle.pack(src, archive)
    out = bundle.unpack(archive, tmp_path / "unpacked")
    vb = bundle.verify(out, trust)
    assert vb.manifest.ref == "rt@2.1.0-rc.1+build.5" and vb.manifest.release == 7
    for name in models:
        entry = vb.manifest.model(name)
        assert vb.model_path(entry.name).read_bytes() == model_paths[name].read_bytes()
        # The unpacked, verified model runs and agrees with the original.
        sess = ort.InferenceSession(str(vb.model_path(entry.name)), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == [t.name for t in entry.inputs]


def test_signature_from_graph(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    vb = bundle.verify(make_bundle("multi_io", "dynamic_conv", "types", "fp16"), trust)
    m = vb.manifest
    multi = m.model("multi_io")
    assert [(t.name, t.dtype, t.shape) for t in multi.inputs] == [
        ("features", "float32", ("batch", 8)), ("ids", "int64", ("batch", 4))]
    assert [(t.name, t.dtype, t.shape) for t in multi.outputs] == [
        ("scores", "float32", ("batch", 3)), ("label", "int64", ("batch",))]
    conv = m.model("dynamic_conv")
    assert conv.inputs[0].shape == ("batch", 3, "height", "width")
    assert conv.inputs[0].dynamic_dims == ("batch", "height", "width")
    assert [t.dtype for t in m.model("types").inputs] == ["int64", "bool"]
    assert m.model("fp16").inputs[0].dtype == "float16"
    assert multi.opset == 17


def test_pack_is_reproducible(make_bundle: MakeBundle, tmp_path: pathlib.Path) -> None:
    b = make_bundle("mlp", "multi_io")
    bundle.pack(b, tmp_path / "one.tar")
    os.utime(b / "outpost.json", (0, 12345))
    bundle.pack(b, tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()


def test_gzip_pack_round_trip(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor], tmp_path: pathlib.Path) -> None:
    b = make_bundle("mlp")
    bundle.pack(b, tmp_path / "b.tar.gz")
    assert (tmp_path / "b.tar.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert bundle.verify(bundle.unpack(tmp_path / "b.tar.gz", tmp_path / "u"), trust).manifest.name == "demo"


def test_unpack_refuses_non_empty_target_and_garbage(tmp_path: pathlib.Path) -> None:
    (tmp_path / "junk.tar").write_bytes(os.urandom(4096))
    with pytest.raises(errors.ArchiveError):
        bundle.unpack(tmp_path / "junk.tar", tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("precious")
    with pytest.raises(errors.BundleError, match="not empty"):
        bundle.unpack(tmp_path / "junk.tar", tmp_path / "full")
    assert (tmp_path / "full" / "keep").read_text() == "precious"


def test_build_refuses_malformed_model(model_paths: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    with pytest.raises(errors.InvalidModel) as e:
        bundle.build([model_paths["malformed"]], tmp_path / "out", bundle.BuildOptions(name="x", version="1.0.0"))
    assert e.value.path.endswith("malformed.onnx")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_build_refuses_bad_options(model_paths: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    with pytest.raises(errors.ManifestSchemaError) as e:
        bundle.build([model_paths["mlp"]], tmp_path / "out", bundle.BuildOptions(name="Bad Name", version="1"))
    assert e.value.field in ("$.name", "$.version")
    assert not (tmp_path / "out").exists()


def test_samples_and_assets(model_paths: dict[str, pathlib.Path], tmp_path: pathlib.Path,
                            keypair: tuple[pathlib.Path, pathlib.Path], trust: list[bundle.TrustAnchor]) -> None:
    samples = tmp_path / "s.npz"
    np.savez(samples, input=np.ones((2, 64), np.float32))
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    out = tmp_path / "b"
    bundle.build([model_paths["mlp"]], out, bundle.BuildOptions(name="s", version="1.0.0", samples=samples,
                                                                assets=(labels,)))
    bundle.sign_directory(out, keypair[0])
    vb = bundle.verify(out, trust)
    assert vb.manifest.samples == "samples.npz" and vb.manifest.assets == ("assets/labels.txt",)
    assert vb.path("assets/labels.txt").read_text() == "cat\ndog\n"
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong_name=np.ones(3))
    with pytest.raises(errors.ManifestError, match="named after model inputs"):
        bundle.build([model_paths["mlp"]], tmp_path / "b2", bundle.BuildOptions(name="s", version="1.0.0",
                                                                               samples=bad))


def test_onnx_scanner_agrees_with_onnx(model_paths: dict[str, pathlib.Path]) -> None:
    import onnx

    from bundle.onnx_refs import external_refs
    path = model_paths["external"]
    model = onnx.load(str(path), load_external_data=False)
    expected = {t.name: {kv.key: kv.value for kv in t.external_data} for t in model.graph.initializer}
    got = {r.tensor: r for r in external_refs(path)}
    assert set(got) == set(expected)
    for name, ref in got.items():
        assert ref.location == expected[name]["location"]
        assert ref.offset == int(expected[name].get("offset", 0))
    assert external_refs(model_paths["big"]) == []


# --- interop with the `model_signing` command-line tool, both directions ---

def test_outpost_signature_verifies_with_model_signing(make_bundle: MakeBundle,
                                                       keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    b = make_bundle("mlp", "multi_io")
    res = subprocess.run([*MODEL_SIGNING, "verify", "key", str(b), "--signature", str(b / "model.sig"),
                          "--public_key", str(keypair[1])], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Verification succeeded" in res.stdout
    (b / "models/mlp.onnx").write_bytes(b"tampered")
    res = subprocess.run([*MODEL_SIGNING, "verify", "key", str(b), "--signature", str(b / "model.sig"),
                          "--public_key", str(keypair[1])], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0


def test_model_signing_signature_verifies_with_outpost(make_bundle: MakeBundle,
                                                       keypair: tuple[pathlib.Path, pathlib.Path],
                                                       trust: list[bundle.TrustAnchor]) -> None:
    b = make_bundle("mlp", sign=False)
    res = subprocess.run([*MODEL_SIGNING, "sign", "key", str(b), "--private_key", str(keypair[0]),
                          "--signature", str(b / "model.sig")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    vb = bundle.verify(b, trust)
    assert vb.manifest.name == "demo"
    doc = json.loads((b / "outpost.json").read_text())
    doc["release"] = 99
    (b / "outpost.json").write_text(json.dumps(doc))
    with pytest.raises(errors.ManifestModified):
        bundle.verify(b, trust)


# --- certificate-based signing ---

def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey,
          issuer: str, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(tmp: pathlib.Path, name: str, obj: object) -> pathlib.Path:
    p = tmp / name
    if isinstance(obj, x509.Certificate):
        p.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        assert isinstance(obj, ec.EllipticCurvePrivateKey)
        p.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    return p


def test_certificate_signing(make_bundle: MakeBundle, tmp_path: pathlib.Path) -> None:
    ca_key, leaf_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("Outpost Test CA", ca_key, ca_key, "Outpost Test CA", ca=True)
    leaf = _cert("release-signer", leaf_key, ca_key, "Outpost Test CA", ca=False)
    rogue_ca = _cert("Rogue CA", rogue_key, rogue_key, "Rogue CA", ca=True)
    ca_pem, rogue_pem = _pem(tmp_path, "ca.pem", ca), _pem(tmp_path, "rogue.pem", rogue_ca)
    b = make_bundle("mlp", sign=False)
    bundle.sign_directory(b, _pem(tmp_path, "leaf.key", leaf_key), signing_certificate=_pem(tmp_path, "leaf.pem", leaf),
                          certificate_chain=[ca_pem])
    vb = bundle.verify(b, bundle.anchors(cert_chain=[ca_pem]))
    assert "certificate chain" in vb.signer
    with pytest.raises(errors.SignatureUntrusted):
        bundle.verify(b, bundle.anchors(cert_chain=[rogue_pem]))


# --- the command line ---

def _outpost(*args: str | os.PathLike[str], cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_cli_end_to_end(model_paths: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    r = _outpost("keys", "generate", "--out", tmp_path / "keys")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "keys/signing.key").stat().st_mode & 0o777 == 0o600
    assert _outpost("keys", "generate", "--out", tmp_path / "keys").returncode == 1  # never overwrites silently
    r = _outpost("bundle", "build", model_paths["multi_io"], "--name", "cli-demo", "--version", "0.3.0",
                 "--release", "3", "--owner", "vision-team", "--slo-p95-ms", "25", "--batch-max", "16",
                 "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert _outpost("bundle", "sign", tmp_path / "b", "--key", tmp_path / "keys/signing.key").returncode == 0
    r = _outpost("bundle", "verify", tmp_path / "b", "--trust", tmp_path / "keys/signing.pub", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bundle"] == "cli-demo@0.3.0"
    r = _outpost("bundle", "inspect", tmp_path / "b", "--json")
    doc = json.loads(r.stdout)["manifest"]
    assert doc["service"]["owner"] == "vision-team" and doc["serving"]["batching"]["max_batch_size"] == 16
    assert "features: float32 [batch, 8]" in _outpost("bundle", "inspect", tmp_path / "b").stdout
    assert _outpost("bundle", "pack", tmp_path / "b", "--out", tmp_path / "b.tar").returncode == 0
    assert _outpost("bundle", "unpack", tmp_path / "b.tar", "--out", tmp_path / "u").returncode == 0
    (tmp_path / "u/models/multi_io.onnx").write_bytes(b"\0")
    r = _outpost("bundle", "verify", tmp_path / "u", "--trust", tmp_path / "keys/signing.pub")
    assert r.returncode == 1
    assert "models/multi_io.onnx" in r.stderr and "Traceback" not in r.stderr


def test_cli_help_is_useful() -> None:
    r = _outpost("--help")
    assert r.returncode == 0 and "bundle" in r.stdout and "keys" in r.stdout
    for sub in (["bundle", "build"], ["bundle", "verify"], ["bundle", "unpack"], ["keys", "generate"]):
        r = _outpost(*sub, "--help")
        assert r.returncode == 0 and "Usage:" in r.stdout and len(r.stdout) > 200


def test_cli_verify_needs_trust(make_bundle: MakeBundle) -> None:
    r = _outpost("bundle", "verify", make_bundle("mlp"))
    assert r.returncode == 2 and "--trust" in r.stderr


def test_unverified_loader_still_checks_the_manifest_hashes(make_bundle: MakeBundle) -> None:
    """The developer's loop skips the signature, never the hashes the manifest itself declares."""
    b = make_bundle("mlp", "multi_io", sign=False)
    vb = bundle.load_unverified(b)
    assert vb.signer == bundle.UNVERIFIED and set(vb.files) == {"outpost.json", "models/mlp.onnx",
                                                                "models/multi_io.onnx"}
    model = b / "models/mlp.onnx"
    data = bytearray(model.read_bytes())
    data[100] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(errors.FileModified, match="manifest's sha256"):
        bundle.load_unverified(b)
    model.write_bytes(bytes(data[:-1]))
    with pytest.raises(errors.FileSizeMismatch, match="truncated"):
        bundle.load_unverified(b)
    model.unlink()
    with pytest.raises(errors.MissingFile):
        bundle.load_unverified(b)


def test_custom_metrics_and_nan_slo_are_optional_and_round_trip(tmp_path: pathlib.Path,
                                                                model_paths: dict[str, pathlib.Path]) -> None:
    plain = bundle.build([model_paths["mlp"]], tmp_path / "plain", bundle.BuildOptions(name="m", version="1.0.0"))
    doc = plain.to_dict()
    assert "metrics" not in doc["service"] and "max_nan_rate" not in doc["service"]["slo"]  # old bytes kept
    opts = bundle.BuildOptions(name="m", version="2.0.0", slo_max_nan_rate=0.002,
                               metrics=({"name": "defects_found", "description": "per frame", "min": 0.1},))
    rich = bundle.build([model_paths["mlp"]], tmp_path / "rich", opts)
    assert rich.service.slo.max_nan_rate == 0.002
    assert rich.service.metrics == (bundle.CustomMetric("defects_found", "per frame", 0.1, None),)
    again = bundle.load_manifest(tmp_path / "rich")
    assert again == rich
    from bundle.errors import ManifestSchemaError
    from bundle.manifest import from_dict
    bad = rich.to_dict()
    bad["service"]["metrics"] = [{"name": "Bad Name"}]
    with pytest.raises(ManifestSchemaError, match="metrics"):
        from_dict(bad)
