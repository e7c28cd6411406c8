"""The one place that talks to the `model-signing` library (OpenSSF Model Signing).

Signing goes through its public API, so a bundle signed here is a plain OMS
signature that `model_signing verify` accepts, and the reverse. Verification
uses the library for the cryptography only (the DSSE envelope, keys and
certificate chains) and returns the *signed* file digests; comparing them with
the files on disk is `bundle.verify`'s job, so every mismatch gets its own
typed error instead of one "Signature mismatch" string. The library's internal
modules are touched here and nowhere else; the dependency is pinned to 1.1.x.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SignatureMalformed, SignatureUntrusted, SigningError
from .manifest import SIGNATURE_NAME

#: An OMS signature lists one digest per file; a few MiB covers huge bundles.
MAX_SIGNATURE_BYTES = 16 << 20


@dataclass(frozen=True)
class KeyAnchor:
    """Trust a bundle signed by the private half of this EC public key (PEM)."""

    public_key: pathlib.Path

    def describe(self) -> str:
        return f"key {self.public_key}"


@dataclass(frozen=True)
class CertificateAnchor:
    """Trust a bundle whose signing certificate chains to these CA certificates."""

    chain: tuple[pathlib.Path, ...]

    def describe(self) -> str:
        return "certificate chain " + ", ".join(map(str, self.chain))


TrustAnchor = KeyAnchor | CertificateAnchor


@dataclass(frozen=True)
class SignedDigest:
    algorithm: str
    hex: str


def _imports() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import model_signing  # noqa: F401  (heavy: sigstore, tuf; imported on first use)
        from model_signing import hashing, signing
        from model_signing._signing import sign_certificate, sign_ec_key, sign_sigstore_pb
    return hashing, signing, sign_ec_key, sign_certificate, sign_sigstore_pb


def sign_directory(
    bundle_dir: str | os.PathLike[str],
    private_key: str | os.PathLike[str],
    *,
    signing_certificate: str | os.PathLike[str] | None = None,
    certificate_chain: Sequence[str | os.PathLike[str]] = (),
    password: str | None = None,
) -> pathlib.Path:
    """Sign every file of `bundle_dir` into `bundle_dir/model.sig`, atomically."""
    hashing, signing, *_ = _imports()
    root = pathlib.Path(bundle_dir)
    sig_path = root / SIGNATURE_NAME
    config = signing.Config()
    try:
        if signing_certificate is not None:
            config.use_certificate_signer(
                private_key=private_key,
                signing_certificate=signing_certificate,
                certificate_chain=list(certificate_chain),
            )
        else:
            config.use_elliptic_key_signer(private_key=private_key, password=password)
    except (ValueError, TypeError, OSError) as e:
        raise SigningError(os.fspath(private_key), f"cannot use this key for signing: {e}") from e
    # Ignore the signature itself (as `model_signing sign` does), so re-signing
    # works and the recorded ignore list matches what the CLI tool writes.
    config.set_hashing_config(
        hashing.Config().set_ignored_paths(paths=[sig_path], ignore_git_paths=False)
    )
    fd, tmp = tempfile.mkstemp(prefix=".sig-", dir=root.parent)
    os.close(fd)
    try:
        config.sign(root, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, sig_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sig_path


def _parse_envelope(sig_path: pathlib.Path) -> Any:
    *_, sign_sigstore_pb = _imports()
    try:
        size = sig_path.stat().st_size
    except FileNotFoundError:
        raise
    if size == 0:
        raise SignatureMalformed(str(sig_path), "signature file is empty")
    if size > MAX_SIGNATURE_BYTES:
        raise SignatureMalformed(str(sig_path), f"signature is {size} bytes, over the {MAX_SIGNATURE_BYTES}-byte limit")
    try:
        return sign_sigstore_pb.Signature.read(sig_path)
    except RecursionError:
        raise SignatureMalformed(str(sig_path), "signature JSON is nested too deeply") from None
    except Exception as e:  # the library raises anything from JSON, KeyError to betterproto errors
        raise SignatureMalformed(
            str(sig_path), f"not an OMS (Sigstore bundle) signature: {type(e).__name__}: {e}"
        ) from None


def signed_digests(
    sig_path: str | os.PathLike[str], anchors: Sequence[TrustAnchor]
) -> tuple[dict[str, SignedDigest], TrustAnchor]:
    """Check the signature against each anchor; return the signed file digests.

    Raises SignatureMalformed (unreadable) or SignatureUntrusted (no anchor
    verifies it). FileNotFoundError is left to the caller, who knows the bundle.
    """
    if not anchors:
        raise SignatureUntrusted(os.fspath(sig_path), "no trusted key or certificate chain was given")
    from cryptography.exceptions import InvalidSignature

    _, _, sign_ec_key, sign_certificate, _ = _imports()
    path = pathlib.Path(sig_path)
    signature = _parse_envelope(path)
    reasons = []
    for anchor in anchors:
        try:
            if isinstance(anchor, KeyAnchor):
                verifier = sign_ec_key.Verifier(anchor.public_key)
            else:
                verifier = sign_certificate.Verifier(list(anchor.chain))
        except (ValueError, OSError, TypeError) as e:
            raise SigningError(anchor.describe(), f"unusable trust anchor: {e}") from e
        try:
            signed = verifier.verify(signature)
        except (InvalidSignature, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            reasons.append(f"{anchor.describe()}: {type(e).__name__} {e}".strip())
            continue
        except Exception as e:  # pyOpenSSL's X509StoreContextError and friends
            reasons.append(f"{anchor.describe()}: {type(e).__name__} {e}".strip())
            continue
        return _digests(path, signed), anchor
    raise SignatureUntrusted(str(path), "not signed by any trusted key (" + "; ".join(reasons) + ")")


def _digests(sig_path: pathlib.Path, signed: Any) -> dict[str, SignedDigest]:
    params = signed.serialization_type
    if params.get("method") != "files":
        raise SignatureMalformed(
            str(sig_path), f"unsupported OMS serialization {params.get('method')!r}; sign per file (the default)"
        )
    out: dict[str, SignedDigest] = {}
    for rd in signed.resource_descriptors():
        out[str(rd.identifier)] = SignedDigest(rd.digest.algorithm, rd.digest.digest_hex)
    return out


def signature_summary(sig_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Unverified facts about a signature, for `outpost bundle inspect`."""
    try:
        doc = json.loads(pathlib.Path(sig_path).read_bytes()[:MAX_SIGNATURE_BYTES])
        material = doc.get("verificationMaterial", {})
    except (OSError, ValueError, AttributeError):
        return {"present": os.path.exists(sig_path), "readable": False}
    kind = "certificate" if "x509CertificateChain" in material or "certificate" in material else "key"
    hint = material.get("publicKey", {}).get("hint") if isinstance(material.get("publicKey"), dict) else None
    return {"present": True, "readable": True, "kind": kind, "key_hint": hint}
