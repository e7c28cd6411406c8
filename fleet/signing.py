"""The fleet's online signing key for assignment documents.

EC P-256, stored as PEM under `DATA/keys/assignment.key` with mode 0600 and
created on first use. Creation writes a temporary file and hard-links it into
place, which fails if another fleet process got there first; the loser loads
the winner's key, so processes sharing a data directory share one key.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pathlib
import tempfile

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bundle import atomic_write_bytes
from contract import ALGORITHM, key_id

from .errors import FleetError

KEY_NAME = "assignment.key"
PUBLIC_NAME = "assignment.pub"
__all__ = ["ALGORITHM", "KEY_NAME", "PUBLIC_NAME", "Signer", "init_key", "load_or_create", "load_private"]


class Signer:
    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        self._key = private_key
        self.public_pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        #: sha256 of the DER SubjectPublicKeyInfo, hex: names the key in documents.
        self.key_id = key_id(self.public_pem)

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self._key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def init_key(key_dir: pathlib.Path) -> tuple[pathlib.Path, bool]:
    """Create the key unless it exists; returns (path, created)."""
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = key_dir / KEY_NAME
    if path.exists():
        return path, False
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd, tmp = tempfile.mkstemp(prefix=".key-", dir=key_dir)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    pub = Signer(load_private(path)).public_pem
    pub_path = key_dir / PUBLIC_NAME
    if not pub_path.exists():

        atomic_write_bytes(pub_path, pub)
    return path, created


def load_private(path: pathlib.Path) -> ec.EllipticCurvePrivateKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise FleetError(f"{path}: signing key readable by others (mode {mode:o}); chmod 600 it")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise FleetError(f"{path}: not an EC P-256 private key")
    return key


def load_or_create(key_dir: pathlib.Path) -> Signer:
    path, _ = init_key(key_dir)
    return Signer(load_private(path))
