"""Bundle verification: bytes on disk in, an immutable verified description out.

Pure in the python-tuf sense: no network, no writes, no global state. The
order matters and follows "verify before you trust":

1. the signature is checked against the trusted anchors *before* any other
   file is read, and yields the signed digest of every file;
2. the set of files on disk must equal the signed set (nothing added, nothing
   removed, nothing that is not a regular file);
3. the manifest's bytes must match their signed digest before it is parsed;
4. every other file is size-checked against the (now trusted) manifest and
   hashed, streaming, stopping one byte past its declared length;
5. ONNX external-data references must stay inside the bundle and be signed.

Any failure raises a typed `BundleError` naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from . import manifest as mf
from . import oms
from .errors import (
    BundleError,
    BundleNotFound,
    ExternalDataError,
    FileModified,
    FileSizeMismatch,
    InvalidModel,
    ManifestInconsistent,
    ManifestModified,
    MissingFile,
    SignatureMalformed,
    SignatureMissing,
    UnreadableFile,
    UnsafeFile,
    UnsignedFile,
)
from .hashing import sha256_bytes, sha256_file
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from .oms import CertificateAnchor, KeyAnchor, TrustAnchor
from .onnx_refs import ProtobufError, external_refs


@dataclass(frozen=True)
class VerifiedFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class VerifiedBundle:
    """What `verify` vouches for. Paths are relative to `root`, POSIX style."""

    root: pathlib.Path
    manifest: Manifest
    files: Mapping[str, VerifiedFile]
    signer: str
    #: model file -> the external-data files it reads (bundle-relative, each a verified file)
    external_data: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def path(self, rel: str) -> pathlib.Path:
        if rel not in self.files:
            raise KeyError(f"{rel} is not a verified file of this bundle")
        return self.root / rel

    def model_path(self, name: str | None = None) -> pathlib.Path:
        return self.path(self.manifest.model(name).file)

    def model_sources(self, name: str | None = None) -> tuple[tuple[str, str], ...]:
        """(path, verified sha256) of every file one model is made of: the model first, then its
        external data. Whoever reads them later must check these digests on the bytes it reads."""
        rel = self.manifest.model(name).file
        return tuple((r, self.files[r].sha256) for r in (rel, *self.external_data.get(rel, ())))

    @property
    def digest(self) -> str:
        """Identity of the whole bundle: the digest of its signed manifest."""
        return self.files[MANIFEST_NAME].sha256


def anchors(
    keys: Iterable[str | os.PathLike[str]] = (), cert_chain: Sequence[str | os.PathLike[str]] = ()
) -> list[TrustAnchor]:
    """Trust anchors from CLI-style paths: each key alone, the chain together."""
    out: list[TrustAnchor] = [KeyAnchor(pathlib.Path(k)) for k in keys]
    if cert_chain:
        out.append(CertificateAnchor(tuple(pathlib.Path(c) for c in cert_chain)))
    return out


def _files_on_disk(root: pathlib.Path) -> dict[str, int]:
    """Relative path -> size of every regular file; anything else is refused."""
    found: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = pathlib.Path(full).relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeFile(str(full), "symbolic links are not allowed in a bundle")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeFile(str(full), "only regular files are allowed in a bundle (device, FIFO or socket found)")
            if rel != SIGNATURE_NAME:
                found[rel] = st.st_size
    return found


def _check_external_data(root: pathlib.Path, model_rel: str, signed: Mapping[str, int]) -> tuple[str, ...]:
    """The bundle-relative files the model's external data lives in; raises if any is not a signed file."""
    model_path = root / model_rel
    try:
        refs = external_refs(model_path)
    except (ProtobufError, ValueError) as e:
        raise InvalidModel(str(model_path), f"not a parseable ONNX protobuf: {e}") from None
    base = pathlib.PurePosixPath(model_rel).parent
    targets: list[str] = []
    for ref in refs:
        loc = ref.location
        where = f"tensor {ref.tensor!r} stores its data at {loc!r}"
        if not loc or "\\" in loc or "\x00" in loc or pathlib.PurePosixPath(loc).is_absolute():
            raise ExternalDataError(
                str(model_path), f"{where}: external data must be a relative path inside the bundle"
            )
        parts: list[str] = []
        for part in (base / loc).parts:
            if part == "..":
                if not parts:
                    raise ExternalDataError(str(model_path), f"{where}, which is outside the bundle")
                parts.pop()
            elif part not in (".", ""):
                parts.append(part)
        target = "/".join(parts)
        if target not in signed:
            raise ExternalDataError(str(model_path), f"{where}, which is not a signed file of the bundle")
        end = ref.offset + (ref.length or 0)
        if ref.offset < 0 or end > signed[target]:
            raise ExternalDataError(str(model_path), f"{where}: offset/length run past the end of {target}")
        if target not in targets:
            targets.append(target)
    return tuple(sorted(targets))


@contextlib.contextmanager
def _typed_os_errors(root: pathlib.Path) -> Iterator[None]:
    """Every failure of a loader is a `BundleError`: an OS refusal too (EACCES, EIO, ENAMETOOLONG...)."""
    try:
        yield
    except BundleError:
        raise
    except OSError as e:
        where = e.filename if isinstance(e.filename, str) else str(root)
        raise UnreadableFile(where, f"cannot read the bundle: {e.strerror or e}") from e


def verify(
    bundle_dir: str | os.PathLike[str], trusted: Sequence[TrustAnchor], *, isolate_signature: bool = False
) -> VerifiedBundle:
    """Verify the bundle at `bundle_dir` against the trusted anchors.

    `isolate_signature` runs the signature step in a child process (see
    `bundle.sigcheck`): long-lived servers use it to keep the OMS stack out of
    their memory. Every other check runs here either way.
    """
    root = pathlib.Path(bundle_dir).absolute()
    with _typed_os_errors(root):
        return _verify(root, trusted, isolate_signature)


def _verify(root: pathlib.Path, trusted: Sequence[TrustAnchor], isolate_signature: bool) -> VerifiedBundle:
    if not root.is_dir():
        raise BundleNotFound(str(root), "no bundle directory here")
    sig = root / SIGNATURE_NAME
    try:
        sig_st = os.lstat(sig)
    except FileNotFoundError:
        raise SignatureMissing(str(sig), "the bundle is not signed (no model.sig)") from None
    if not stat.S_ISREG(sig_st.st_mode):
        raise UnsafeFile(str(sig), "the signature must be a regular file")

    if isolate_signature:
        from .sigcheck import signed_digests_isolated

        signed, anchor = signed_digests_isolated(sig, trusted)
    else:
        signed, anchor = oms.signed_digests(sig, trusted)
    for rel, d in signed.items():
        if d.algorithm != "sha256":
            raise SignatureMalformed(str(sig), f"{rel} is signed with {d.algorithm}; Outpost requires sha256")

    on_disk = _files_on_disk(root)
    for rel in sorted(set(on_disk) - set(signed)):
        raise UnsignedFile(str(root / rel), "this file is not covered by the signature (added after signing)")
    for rel in sorted(set(signed) - set(on_disk)):
        raise MissingFile(str(root / rel), "this signed file is missing (removed after signing)")
    if MANIFEST_NAME not in signed:
        raise MissingFile(str(root / MANIFEST_NAME), "the bundle has no signed manifest")

    manifest_path = root / MANIFEST_NAME
    raw = mf.read_bounded(manifest_path, mf.MAX_MANIFEST_BYTES)
    if sha256_bytes(raw) != signed[MANIFEST_NAME].hex:
        raise ManifestModified(str(manifest_path), "the manifest was changed after signing")
    manifest = mf.parse(raw, str(manifest_path))

    for rel in manifest.declared_files():
        if rel not in signed:
            raise ManifestInconsistent(str(manifest_path), f"names {rel}, which the bundle does not contain")
    for m in manifest.models:
        if m.sha256 != signed[m.file].hex:
            raise ManifestInconsistent(str(manifest_path), f"sha256 of {m.file} differs from the signed digest")

    files = {MANIFEST_NAME: VerifiedFile(MANIFEST_NAME, len(raw), signed[MANIFEST_NAME].hex)}
    files.update(_hash_checked(
        root, on_disk, manifest, {rel: d.hex for rel, d in signed.items() if rel != MANIFEST_NAME},
        "content does not match its signed digest (modified, corrupted or swapped from another bundle)",
    ))
    return _checked_bundle(root, manifest, files, anchor.describe())


def _hash_checked(root: pathlib.Path, on_disk: Mapping[str, int], manifest: Manifest,
                  expected: Mapping[str, str | None], mismatch: str) -> dict[str, VerifiedFile]:
    """Size-check (against the manifest) then hash every file of `expected`, streaming.

    A None digest is hashed without a comparison (the unverified loader's extra files).
    """
    declared_sizes = {m.file: m.size for m in manifest.models}
    files: dict[str, VerifiedFile] = {}
    for rel in sorted(expected):
        full = root / rel
        size = on_disk[rel]
        declared = declared_sizes.get(rel)
        if declared is not None and size != declared:
            change = "truncated" if size < declared else "extended"
            raise FileSizeMismatch(str(full), f"{size} bytes where the manifest says {declared} ({change})")
        digest, read = sha256_file(full, declared if declared is not None else size)
        want = expected[rel]
        if want is not None and digest != want:
            raise FileModified(str(full), mismatch)
        files[rel] = VerifiedFile(rel, read, digest)
    return files


def _checked_bundle(root: pathlib.Path, manifest: Manifest, files: dict[str, VerifiedFile],
                    signer: str) -> VerifiedBundle:
    """Last step of both loaders: external data must stay inside the bundle."""
    sizes = {rel: f.size for rel, f in files.items()}
    external = {m.file: _check_external_data(root, m.file, sizes) for m in manifest.models}
    return VerifiedBundle(root, manifest, MappingProxyType(files), signer, MappingProxyType(external))


UNVERIFIED = "UNVERIFIED (no signature check)"


def load_unverified(bundle_dir: str | os.PathLike[str]) -> VerifiedBundle:
    """A developer's loop only: check the manifest's own hashes, skip the signature.

    Production paths (the agent, the fleet) never call this; `outpost serve`
    without `--trust` does, and says so loudly. `signer` is `UNVERIFIED`.
    """
    root = pathlib.Path(bundle_dir).absolute()
    with _typed_os_errors(root):
        return _load_unverified(root)


def _load_unverified(root: pathlib.Path) -> VerifiedBundle:
    if not root.is_dir():
        raise BundleNotFound(str(root), "no bundle directory here")
    manifest_path, raw = mf.read_raw(root)
    manifest = mf.parse(raw, manifest_path)
    on_disk = _files_on_disk(root)
    for m in manifest.models:
        if m.file not in on_disk:
            raise MissingFile(str(root / m.file), "the manifest names this model but it is missing")
    expected: dict[str, str | None] = {rel: None for rel in on_disk if rel != MANIFEST_NAME}
    expected.update({m.file: m.sha256 for m in manifest.models})
    files = {MANIFEST_NAME: VerifiedFile(MANIFEST_NAME, len(raw), sha256_bytes(raw))}
    files.update(_hash_checked(root, on_disk, manifest, expected, "content does not match the manifest's sha256"))
    return _checked_bundle(root, manifest, files, UNVERIFIED)
