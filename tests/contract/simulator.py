"""An in-memory signer of assignment documents, in the spirit of python-tuf's repository simulator.

It signs with a real EC P-256 key through `contract.seal`, exactly as the
fleet does, and lets a test tamper with any layer: the document before
signing, the payload bytes, the signature, the envelope.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from contract import build_document, bundle_entry, canonical_bytes, key_id, seal

NOW = 1_800_000_000.0
DEVICE = "dev-1"
HEX_A, HEX_B = "a" * 64, "b" * 64


@dataclass
class Signer:
    curve: ec.EllipticCurve = field(default_factory=ec.SECP256R1)

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(self.curve)
        self.public_pem = self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        self.key_id = key_id(self.public_pem)

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self.key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()

    def envelope(self, doc: dict[str, Any]) -> dict[str, Any]:
        return seal(doc, self.sign, self.key_id)

    def raw(self, payload: bytes, document: Any = None) -> dict[str, Any]:
        """An envelope over arbitrary bytes (signed correctly), for payloads the fleet would never make."""
        env = {"payload": base64.b64encode(payload).decode(), "signature": self.sign(payload),
               "key_id": self.key_id, "algorithm": "ecdsa-p256-sha256"}
        if document is not None:
            env["document"] = document
        return env


def document(serial: int = 5, device_id: str = DEVICE, issued_at: float = NOW - 60, ttl_s: float = 3600,
             **overrides: Any) -> dict[str, Any]:
    bundles = [bundle_entry("demo", "1.0.0", 3, HEX_A, HEX_B, 1234, False),
               bundle_entry("other", "2.1.0", 7, HEX_B, HEX_A, 99, False)]
    doc = build_document(device_id, serial, issued_at, issued_at + ttl_s, bundles, ["old@0.1.0"])
    doc.update(overrides)
    return doc


def mutate(doc: dict[str, Any], fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    fn(out)
    return out


__all__ = ["DEVICE", "NOW", "Signer", "canonical_bytes", "document", "mutate"]
