"""The eleven rejection cases of the bundle specification, each on a real signed bundle.

Every case must raise its own typed error naming the file and the reason,
and leave nothing written outside the staging directory.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import onnx
import pytest

import bundle
from bundle import errors
from tests.conftest import MakeBundle


def _snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_untouched_bundle_verifies(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    vb = bundle.verify(make_bundle("mlp"), trust)
    assert vb.manifest.ref == "demo@1.0.0"
    assert set(vb.files) == {"outpost.json", "models/mlp.onnx"}


# 1. one bit flipped in a model file
def test_bit_flip_in_model(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    b = make_bundle("mlp")
    model = b / "models/mlp.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(errors.FileModified) as e:
        bundle.verify(b, trust)
    assert e.value.path.endswith("models/mlp.onnx")
    assert "signed digest" in e.value.reason


# 2. a file truncated or extended
@pytest.mark.parametrize("change", ["truncated", "extended"])
def test_truncated_or_extended(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor], change: str) -> None:
    b = make_bundle("mlp")
    model = b / "models/mlp.onnx"
    data = model.read_bytes()
    model.write_bytes(data[:-100] if change == "truncated" else data + b"\0" * 100)
    with pytest.raises(errors.FileSizeMismatch) as e:
        bundle.verify(b, trust)
    assert e.value.path.endswith("models/mlp.onnx")
    assert change in e.value.reason


# 3. a file added to or removed from the bundle after signing
def test_file_added_after_signing(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    b = make_bundle("mlp")
    (b / "models" / "evil.py").write_text("import os\n")
    with pytest.raises(errors.UnsignedFile) as e:
        bundle.verify(b, trust)
    assert e.value.path.endswith("models/evil.py")


def test_hidden_git_file_added_is_refused_too(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    """model_signing ignores .git* files by default; Outpost accepts no unsigned file at all."""
    b = make_bundle("mlp")
    (b / ".gitattributes").write_text("* binary\n")
    with pytest.raises(errors.UnsignedFile):
        bundle.verify(b, trust)


def test_file_removed_after_signing(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    b = make_bundle("mlp", "multi_io")
    (b / "models/multi_io.onnx").unlink()
    with pytest.raises(errors.MissingFile) as e:
        bundle.verify(b, trust)
    assert e.value.path.endswith("models/multi_io.onnx")


# 4. the manifest edited after signing
def test_manifest_edited(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    b = make_bundle("mlp")
    doc = json.loads((b / "outpost.json").read_text())
    doc["serving"]["batching"]["max_batch_size"] = 4096
    (b / "outpost.json").write_text(json.dumps(doc))
    with pytest.raises(errors.ManifestModified) as e:
        bundle.verify(b, trust)
    assert e.value.path.endswith("outpost.json")


# 5. a valid signature from a key that is not trusted
def test_untrusted_key(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor],
                       other_keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    b = make_bundle("mlp", key=other_keypair[0])
    bundle.verify(b, bundle.anchors([other_keypair[1]]))  # valid, for the key that made it
    with pytest.raises(errors.SignatureUntrusted) as e:
        bundle.verify(b, trust)
    assert e.value.path.endswith("model.sig")
    assert "trusted" in e.value.reason


def test_key_rotation_any_trusted_key_works(make_bundle: MakeBundle, keypair: tuple[pathlib.Path, pathlib.Path],
                                            other_keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    b = make_bundle("mlp", key=other_keypair[0])
    both = bundle.anchors([keypair[1], other_keypair[1]])
    assert bundle.verify(b, both).signer.endswith(str(other_keypair[1]))
    with pytest.raises(errors.SignatureUntrusted):  # the old key removed: stops working
        bundle.verify(b, bundle.anchors([keypair[1]]))


# 6. no signature, or an empty or garbled one
def test_no_signature(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    b = make_bundle("mlp", sign=False)
    with pytest.raises(errors.SignatureMissing) as e:
        bundle.verify(b, trust)
    assert e.value.path.endswith("model.sig")


def test_empty_signature(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    b = make_bundle("mlp")
    (b / "model.sig").write_bytes(b"")
    with pytest.raises(errors.SignatureMalformed) as e:
        bundle.verify(b, trust)
    assert "empty" in e.value.reason


@pytest.mark.parametrize("garbage", [b"not json at all", b'{"mediaType": 1}', b"[" * 100_000, b"\xff\xfe\x00"])
def test_garbled_signature(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor], garbage: bytes) -> None:
    b = make_bundle("mlp")
    (b / "model.sig").write_bytes(garbage)
    with pytest.raises(errors.SignatureMalformed) as e:
        bundle.verify(b, trust)
    assert e.value.path.endswith("model.sig")


def test_signature_bytes_flipped(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    b = make_bundle("mlp")
    doc = json.loads((b / "model.sig").read_text())
    sig = doc["dsseEnvelope"]["signatures"][0]["sig"]
    doc["dsseEnvelope"]["signatures"][0]["sig"] = ("A" if sig[0] != "A" else "B") + sig[1:]
    (b / "model.sig").write_text(json.dumps(doc))
    with pytest.raises(errors.SignatureError):
        bundle.verify(b, trust)


# 7. a model file from another signed bundle swapped in (mix-and-match)
def test_mix_and_match_model(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor],
                             model_paths: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    a = make_bundle("mlp", name="a")
    # Same architecture, other weights, *validly signed* in its own bundle.
    other_model = tmp_path / "mlp.onnx"
    from tests.models.make_models import mlp
    onnx.save_model(mlp(seed=42), str(other_model))
    b = tmp_path / "b"
    bundle.build([other_model], b, bundle.BuildOptions(name="b", version="1.0.0"))
    shutil.copy(b / "models/mlp.onnx", a / "models/mlp.onnx")
    assert (a / "models/mlp.onnx").stat().st_size == bundle.load_manifest(a).models[0].size
    with pytest.raises(errors.FileModified) as e:
        bundle.verify(a, trust)
    assert e.value.path.endswith("models/mlp.onnx")


def test_mix_and_match_manifest_and_signature(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    """Another bundle's manifest and signature over this bundle's model: one signature binds every file."""
    a = make_bundle("mlp", name="a")
    b = make_bundle("multi_io", name="b")
    shutil.copy(b / "outpost.json", a / "outpost.json")
    shutil.copy(b / "model.sig", a / "model.sig")
    with pytest.raises(errors.IntegrityError):
        bundle.verify(a, trust)


# 8. archive members: absolute path, '..', symlink, hard link, device node
def _tar_with(tmp_path: pathlib.Path, member: object, payload: bytes = b"x") -> pathlib.Path:
    import io
    import tarfile
    assert isinstance(member, tarfile.TarInfo)
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("outpost.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        if member.isreg():
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        else:
            tar.addfile(member)
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "chardev", "blockdev", "fifo"])
def test_unsafe_archive_members(tmp_path: pathlib.Path, kind: str) -> None:
    import tarfile
    outside = tmp_path / "outside"
    outside.mkdir()
    m = tarfile.TarInfo("models/x")
    if kind == "absolute":
        m.name = str(outside / "pwned")
    elif kind == "dotdot":
        m.name = "models/../../outside/pwned"
    elif kind == "symlink":
        m.type, m.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        m.type, m.linkname = tarfile.LNKTYPE, "outpost.json"
    elif kind == "chardev":
        m.type, m.devmajor, m.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "blockdev":
        m.type, m.devmajor, m.devminor = tarfile.BLKTYPE, 8, 0
    else:
        m.type = tarfile.FIFOTYPE
    archive = _tar_with(tmp_path, m)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(errors.UnsafeArchiveMember) as e:
        bundle.unpack(archive, tmp_path / "out")
    assert e.value.path == str(archive)
    assert not (tmp_path / "out").exists()
    assert not list(outside.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # staging cleaned up


def test_duplicate_archive_member(tmp_path: pathlib.Path) -> None:
    import tarfile
    m = tarfile.TarInfo("outpost.json")
    with pytest.raises(errors.UnsafeArchiveMember, match="twice"):
        bundle.unpack(_tar_with(tmp_path, m, b"{}"), tmp_path / "out")


# 9. decompression bomb, stopped while streaming
def test_decompression_bomb(tmp_path: pathlib.Path) -> None:
    import gzip
    import tarfile
    bomb = tmp_path / "bomb.tar.gz"
    zeros = b"\0" * (1 << 20)
    with gzip.open(bomb, "wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("models/huge.onnx")
        info.size = 256 << 20
        import io

        class Zeros(io.RawIOBase):
            left = info.size

            def readable(self) -> bool:
                return True

            def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
                n = min(len(b), self.left, len(zeros))
                b[:n] = zeros[:n]
                self.left -= n
                return n

        tar.addfile(info, io.BufferedReader(Zeros()))
    assert bomb.stat().st_size < 1 << 20  # under 1 MiB on disk, 256 MiB expanded
    with pytest.raises(errors.ArchiveTooLarge) as e:
        bundle.unpack(bomb, tmp_path / "out", max_bytes=64 << 20)
    assert "limit" in e.value.reason
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.tar.gz"]


def test_bomb_of_many_small_members(tmp_path: pathlib.Path) -> None:
    import io
    import tarfile
    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(60):
            info = tarfile.TarInfo(f"f{i}")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(errors.ArchiveTooLarge, match="members"):
        bundle.unpack(path, tmp_path / "out", max_members=50)


# 10. ONNX external data pointing outside the bundle
@pytest.mark.parametrize("location", ["../../../etc/passwd", "/etc/passwd", "../secret.bin", "missing.bin"])
def test_external_data_outside_bundle(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor],
                                      model_paths: dict[str, pathlib.Path], tmp_path: pathlib.Path,
                                      keypair: tuple[pathlib.Path, pathlib.Path], location: str) -> None:
    b = make_bundle("external")
    model_file = b / "models/external.onnx"
    model = onnx.load(str(model_file), load_external_data=False)
    for t in model.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = location
    onnx.save_model(model, str(model_file))
    # Re-sign and fix the manifest so that *only* the reference is wrong.
    doc = json.loads((b / "outpost.json").read_text())
    digest, size = bundle.sha256_file(model_file)
    doc["models"][0].update(sha256=digest, size=size)
    (b / "outpost.json").write_text(json.dumps(doc))
    bundle.sign_directory(b, keypair[0])
    with pytest.raises(errors.ExternalDataError) as e:
        bundle.verify(b, trust)
    assert e.value.path.endswith("models/external.onnx")
    assert location in e.value.reason


def test_external_data_inside_bundle_is_fine(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    vb = bundle.verify(make_bundle("external"), trust)
    assert "models/external.onnx.data" in vb.files


# 11. manifest that does not match the schema, with the field named
@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("version"), "$"),
        (lambda d: d.update(release="7"), "$.release"),
        (lambda d: d.update(release=2**63), "$.release"),
        (lambda d: d["models"][0].update(size=10**30), "$.models[0].size"),
        (lambda d: d["models"][0]["inputs"][0].update(dtype="complex128"), "$.models[0].inputs[0].dtype"),
        (lambda d: d["serving"]["batching"].update(max_batch_size=-1), "$.serving.batching.max_batch_size"),
        (lambda d: d.update(version="1.0"), "$.version"),
        (lambda d: d["models"][0].update(file="../../etc/passwd"), "$.models[0].file"),
        (lambda d: d.update(surprise=True), "$"),
    ],
    ids=["missing", "wrong-type", "huge-release", "huge-size", "bad-dtype", "negative", "not-semver",
         "path-escape", "unknown-field"],
)
def test_manifest_schema_violations(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor],
                                    keypair: tuple[pathlib.Path, pathlib.Path], mutate: object, field: str) -> None:
    b = make_bundle("mlp")
    doc = json.loads((b / "outpost.json").read_text())
    assert callable(mutate)
    mutate(doc)
    (b / "outpost.json").write_text(json.dumps(doc))
    bundle.sign_directory(b, keypair[0])  # validly signed: the schema must still refuse it
    with pytest.raises(errors.ManifestSchemaError) as e:
        bundle.verify(b, trust)
    assert e.value.field == field
    assert e.value.path.endswith("outpost.json")


def test_manifest_deeply_nested_or_huge(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor],
                                        keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    b = make_bundle("mlp")
    (b / "outpost.json").write_bytes(b'{"a":' * 50_000 + b"1" + b"}" * 50_000)
    bundle.sign_directory(b, keypair[0])
    with pytest.raises(errors.ManifestError):
        bundle.verify(b, trust)
    (b / "outpost.json").write_bytes(b" " * (2 << 20))
    bundle.sign_directory(b, keypair[0])
    with pytest.raises(errors.ManifestError, match="limit"):
        bundle.verify(b, trust)


def test_manifest_sha_disagrees_with_signature(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor],
                                               keypair: tuple[pathlib.Path, pathlib.Path]) -> None:
    b = make_bundle("mlp")
    doc = json.loads((b / "outpost.json").read_text())
    doc["models"][0]["sha256"] = "0" * 64
    (b / "outpost.json").write_text(json.dumps(doc))
    bundle.sign_directory(b, keypair[0])
    with pytest.raises(errors.ManifestInconsistent, match="sha256"):
        bundle.verify(b, trust)


def test_symlink_inside_bundle_refused(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    b = make_bundle("mlp")
    os.symlink("/etc/passwd", b / "models" / "link")
    with pytest.raises(errors.UnsafeFile, match="symbolic"):
        bundle.verify(b, trust)


def test_fifo_inside_bundle_refused(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    b = make_bundle("mlp")
    os.mkfifo(b / "models" / "pipe")
    with pytest.raises(errors.UnsafeFile, match="regular"):
        bundle.verify(b, trust)


def test_verify_writes_nothing(make_bundle: MakeBundle, trust: list[bundle.TrustAnchor]) -> None:
    b = make_bundle("mlp", "multi_io")
    before = _snapshot(b.parent)
    bundle.verify(b, trust)
    (b / "models/mlp.onnx").write_bytes(b"x")
    before = _snapshot(b.parent)
    with pytest.raises(errors.BundleError):
        bundle.verify(b, trust)
    assert _snapshot(b.parent) == before
