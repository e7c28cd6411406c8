"""Signing keys: EC P-256 in PEM, the key type OMS and `model_signing` agree on."""

from __future__ import annotations

import hashlib
import os
import pathlib

from .errors import SigningError
from .fsutil import atomic_write_bytes

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


def generate(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[pathlib.Path, pathlib.Path]:
    """Write `signing.key` (mode 0600) and `signing.pub` into `out_dir`."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from cryptography.hazmat.primitives import serialization  # lazy: servers that only verify never pay for it
    from cryptography.hazmat.primitives.asymmetric import ec

    key_path, pub_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    if not overwrite and (key_path.exists() or pub_path.exists()):
        raise SigningError(str(key_path), "a key already exists here; refusing to overwrite it (use --force)")
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write_bytes(key_path, private, mode=0o600)
    atomic_write_bytes(pub_path, public, mode=0o644)
    return key_path, pub_path


def fingerprint(public_key_pem: bytes) -> str:
    """SHA-256 of the SubjectPublicKeyInfo PEM: the `hint` OMS records in signatures."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except ValueError as e:
        raise SigningError("<public key>", f"not a PEM public key: {e}") from e
    raw = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(raw).hexdigest()
