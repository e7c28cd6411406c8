"""The signature step run in a child process gives the same answers and the same typed errors."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import bundle
from bundle import errors
from tests.conftest import MakeBundle


def test_isolated_verify_accepts_and_names_the_signer(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor],
                                                      other_keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    b = make_bundle("mlp", "multi_io")
    rotated = [*bundle.anchors([other_keypair[1]]), *trust]
    vb = bundle.verify(b, rotated, isolate_signature=True)
    assert vb == bundle.verify(b, rotated)
    assert vb.signer == trust[0].describe()


@pytest.mark.parametrize(("damage", "error"), [
    (lambda b: (b / "model.sig").write_bytes(b""), errors.SignatureMalformed),
    (lambda b: (b / "model.sig").write_bytes(b"{garbled"), errors.SignatureMalformed),
    (lambda b: (b / "models/mlp.onnx").write_bytes(b"\0"), errors.FileSizeMismatch),
    (lambda b: (b / "extra.bin").write_bytes(b"\0"), errors.UnsignedFile),
], ids=["empty", "garbled", "truncated", "added"])
def test_isolated_verify_refuses_with_typed_errors(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor],
                                                   damage: object, error: type[errors.BundleError]) -> None:
    b = make_bundle("mlp")
    assert callable(damage)
    damage(b)
    with pytest.raises(error) as e:
        bundle.verify(b, trust, isolate_signature=True)
    assert str(b) in e.value.path


def test_isolated_verify_untrusted(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor],
                                   other_keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    b = make_bundle("mlp", key=other_keypair[0])
    with pytest.raises(errors.SignatureUntrusted, match="not signed by any trusted key"):
        bundle.verify(b, trust, isolate_signature=True)


def test_caller_never_imports_the_signing_stack(make_bundle: MakeBundle,
                                                keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    b = make_bundle("mlp")
    code = (
        "import sys, bundle\n"
        f"vb = bundle.verify({str(b)!r}, bundle.anchors([{str(keypair[1])!r}]), isolate_signature=True)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('model_signing', 'sigstore', 'tuf'))\n"
        "print(vb.manifest.ref, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "demo@1.0.0 []"
