"""The signed assignment document: its format, its bytes, and the device's verification.

Format (version 1). The fleet answers ``GET /api/v1/devices/{id}/assignment``
with an *envelope*::

    {"payload": "<base64 of the canonical document bytes>",
     "signature": "<base64 DER ECDSA P-256 / SHA-256 signature over those bytes>",
     "key_id": "<sha256 hex of the fleet key's DER SubjectPublicKeyInfo>",
     "algorithm": "ecdsa-p256-sha256",
     "document": {...the same document, decoded, for people and logs...}}

The canonical bytes are ``json.dumps(doc, sort_keys=True, separators=(",", ":"),
ensure_ascii=False).encode("utf-8")`` of::

    {"type": "outpost.assignment", "format": 1,
     "device_id": "...", "serial": 7,
     "issued_at": 1764400000.0, "expires_at": 1764486400.0,
     "bundles": [{"name", "version", "ref", "release", "digest", "archive_sha256", "size",
                  "revoked": false, "url": "/api/v1/bundles/NAME/VERSION/archive",
                  "constraints": {"architectures": ["x86_64"], "min_compute_capability": "7.5",
                                  "engines": ["tensorrt", "cuda", "cpu"]}}],
     "revoked": ["name@version", ...]}

The serial grows by one with every change of the device's set and with every
revocation that concerns it, and is never reused; the same serial is re-signed
with a fresh expiry on every request, so one serial always names one content.
``revoked`` lists the revoked bundles the device is assigned or last reported
installed: it must stop running them.

A bundle's ``constraints`` (optional: documents of older fleets lack it) copy
the signed manifest's hardware constraints and engine list, so a device can
refuse a bundle it cannot run *before* downloading it. They are a forecast:
the manifest inside the verified archive stays the authority and is checked
again after verification.

Verification follows python-tuf's trusted metadata set: a pure function of
(envelope, trusted key, trusted state, clock) with no I/O, which checks the
key and the signature over the exact payload bytes *before* parsing them, then
the format, then the document's binding to this device, its serial against the
highest one accepted (rollback) and its expiry (freeze). The ``document`` copy
is never trusted: it must equal the signed payload or the envelope is refused.
Bundle URLs must be fleet-relative paths: the device sends its credential with
every download, so a document can never send it to another host.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from .errors import BadSignature, Expired, ForeignDevice, Garbled, Replayed, WrongKey

DOCUMENT_TYPE = "outpost.assignment"
DOCUMENT_FORMAT = 1
ALGORITHM = "ecdsa-p256-sha256"
MAX_BUNDLES = 64
#: Highest serial a device accepts: a signed absurd serial would otherwise lock it out of every later update.
MAX_SERIAL = 2**62
#: Largest base64 payload read at all (a document of 64 bundles is about 40 kB).
MAX_PAYLOAD_CHARS = 1 << 20
MAX_BUNDLE_BYTES = 1 << 40
_HEX64 = "^[0-9a-f]{64}$"
_NAME = "^[a-z0-9][a-z0-9._-]{0,63}$"
_VERSION = "^[^@/\\s?#]{1,128}$"
_REF = "^[^@]{1,128}@[^@]{1,128}$"

_CC = "^[0-9]{1,2}(\\.[0-9]{1,2})?$"
#: A bundle's hardware and runtime needs, copied from its signed manifest (unknown keys allowed: newer fleets).
CONSTRAINTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["architectures"],
    "properties": {
        "architectures": {"type": "array", "minItems": 1, "maxItems": 16,
                          "items": {"type": "string", "minLength": 1, "maxLength": 32}},
        "min_compute_capability": {"type": ["string", "null"], "pattern": _CC},
        "engines": {"type": "array", "minItems": 1, "maxItems": 16,
                    "items": {"type": "string", "minLength": 1, "maxLength": 32}},
    },
}
BUNDLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "version", "ref", "release", "digest", "archive_sha256", "size", "revoked", "url"],
    "properties": {
        "name": {"type": "string", "pattern": _NAME},
        "version": {"type": "string", "pattern": _VERSION},
        "ref": {"type": "string", "pattern": _REF},
        "release": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
        "digest": {"type": "string", "pattern": _HEX64},
        "archive_sha256": {"type": "string", "pattern": _HEX64},
        "size": {"type": "integer", "minimum": 1, "maximum": MAX_BUNDLE_BYTES},
        "revoked": {"type": "boolean"},
        "url": {"type": "string", "maxLength": 512, "pattern": "^/api/v1/bundles/[^?#\\\\]+$"},
        "constraints": CONSTRAINTS_SCHEMA,
    },
}
#: JSON Schema of the signed document (unknown extra fields are allowed: a newer fleet may add some).
DOCUMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "format", "device_id", "serial", "issued_at", "expires_at", "bundles", "revoked"],
    "properties": {
        "type": {"const": DOCUMENT_TYPE},
        "format": {"const": DOCUMENT_FORMAT},
        "device_id": {"type": "string", "minLength": 1, "maxLength": 200},
        "serial": {"type": "integer", "minimum": 0, "maximum": MAX_SERIAL},
        "issued_at": {"type": "number", "minimum": 0, "maximum": 1e11},
        "expires_at": {"type": "number", "minimum": 0, "maximum": 1e11},
        "bundles": {"type": "array", "maxItems": MAX_BUNDLES, "items": BUNDLE_SCHEMA},
        "revoked": {"type": "array", "maxItems": 1024, "items": {"type": "string", "pattern": _REF}},
    },
}
_DOCUMENT = Draft202012Validator(DOCUMENT_SCHEMA)


def canonical_bytes(doc: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def key_id(public_pem: bytes) -> str:
    """sha256 hex of the key's DER SubjectPublicKeyInfo: how documents name the key."""
    key = serialization.load_pem_public_key(public_pem)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def verify_signature(public_pem: bytes, payload: bytes, signature_b64: str) -> bool:
    """True only for this exact payload under this EC P-256 key."""
    try:
        key = serialization.load_pem_public_key(public_pem)
    except ValueError:
        return False
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return False
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def build_document(device_id: str, serial: int, issued_at: float, expires_at: float,
                   bundles: Iterable[Mapping[str, Any]], revoked: Iterable[str]) -> dict[str, Any]:
    """The fleet's side: a document in this format (bundles already in their wire form)."""
    return {"type": DOCUMENT_TYPE, "format": DOCUMENT_FORMAT, "device_id": device_id, "serial": serial,
            "issued_at": issued_at, "expires_at": expires_at, "bundles": [dict(b) for b in bundles],
            "revoked": sorted(revoked)}


def bundle_entry(name: str, version: str, release: int, digest: str, archive_sha256: str, size: int,
                 revoked: bool, constraints: BundleConstraints | None = None) -> dict[str, Any]:
    """One bundle of a document, in its wire form (the URL is derived, never chosen by a caller)."""
    entry: dict[str, Any] = {"name": name, "version": version, "ref": f"{name}@{version}", "release": release,
                             "digest": digest, "archive_sha256": archive_sha256, "size": size, "revoked": revoked,
                             "url": f"/api/v1/bundles/{name}/{version}/archive"}
    if constraints is not None:
        entry["constraints"] = constraints.to_json()
    return entry


def seal(doc: Mapping[str, Any], sign: Callable[[bytes], str], signer_key_id: str) -> dict[str, Any]:
    """The fleet's side: the envelope of a document, signed by `sign` (base64 signature of the bytes)."""
    payload = canonical_bytes(doc)
    return {"payload": base64.b64encode(payload).decode(), "signature": sign(payload),
            "key_id": signer_key_id, "algorithm": ALGORITHM, "document": dict(doc)}


@dataclass(frozen=True)
class BundleConstraints:
    """What a bundle needs of a device: architectures, a GPU's compute capability, engine kinds (any one)."""

    architectures: tuple[str, ...]
    min_compute_capability: str | None = None
    #: the manifest's engine kinds in preference order ("tensorrt", "cuda", "cpu"); empty: not stated
    engines: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> BundleConstraints | None:
        """From a manifest's JSON (as the fleet stores it); None when it states no constraints."""
        c = manifest.get("constraints")
        if not isinstance(c, Mapping) or not c.get("architectures"):
            return None
        engines = (manifest.get("serving") or {}).get("engines") or ()
        return cls(tuple(str(a) for a in c["architectures"]), c.get("min_compute_capability"),
                   tuple(str(e) for e in engines))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": list(self.architectures),
                               "min_compute_capability": self.min_compute_capability}
        if self.engines:
            out["engines"] = list(self.engines)
        return out


@dataclass(frozen=True)
class AssignedBundle:
    name: str
    version: str
    ref: str
    release: int
    digest: str
    archive_sha256: str
    size: int
    url: str
    revoked: bool
    #: None when the fleet's document does not carry them (older fleets): checked after verification only
    constraints: BundleConstraints | None = None


@dataclass(frozen=True)
class Assignment:
    """A verified document: what this device must run now."""

    device_id: str
    serial: int
    issued_at: float
    expires_at: float
    bundles: tuple[AssignedBundle, ...]
    revoked: tuple[str, ...]

    def bundle(self, name: str) -> AssignedBundle | None:
        return next((b for b in self.bundles if b.name == name), None)


@dataclass(frozen=True)
class AssignmentState:
    """What the device trusts so far: persisted by the agent, handed back on every verification.

    A fresh device starts at `initial(device_id)`; after accepting a document
    it stores `state.after(assignment)`.
    """

    device_id: str
    last_serial: int = 0
    last_issued_at: float = 0.0

    @classmethod
    def initial(cls, device_id: str) -> AssignmentState:
        return cls(device_id)

    def after(self, accepted: Assignment) -> AssignmentState:
        if accepted.serial == self.last_serial:
            return AssignmentState(self.device_id, self.last_serial, max(self.last_issued_at, accepted.issued_at))
        return AssignmentState(self.device_id, accepted.serial, accepted.issued_at)


def verify_assignment(envelope: Mapping[str, Any], fleet_public_key_pem: bytes | Sequence[bytes],
                      state: AssignmentState, now: float) -> Assignment:
    """The document inside `envelope` if this device may act on it; else an `AssignmentRejected`.

    `fleet_public_key_pem` is the trusted fleet key, or several during a key
    rotation (the envelope's `key_id` picks one). An equal serial is accepted
    (the fleet re-signs the same content with a fresh expiry); a lower one is
    a replay.
    """
    if not isinstance(envelope, Mapping):
        raise Garbled("assignment envelope is not a JSON object")
    fields = {k: envelope.get(k) for k in ("payload", "signature", "key_id", "algorithm")}
    for name, value in fields.items():
        if not isinstance(value, str) or not value:
            raise Garbled(f"assignment envelope: {name} missing or not a string")
    payload_b64, signature, envelope_key_id, algorithm = (str(v) for v in fields.values())
    if algorithm != ALGORITHM:
        raise Garbled(f"assignment envelope: algorithm {algorithm[:40]!r} is not {ALGORITHM}")
    if len(payload_b64) > MAX_PAYLOAD_CHARS:
        raise Garbled(f"assignment payload longer than {MAX_PAYLOAD_CHARS} characters")
    public_pem = _trusted_key(fleet_public_key_pem, envelope_key_id)
    try:
        payload = base64.b64decode(payload_b64, validate=True)
    except (binascii.Error, ValueError):
        raise Garbled("assignment payload is not valid base64") from None
    if not verify_signature(public_pem, payload, signature):
        raise BadSignature("assignment signature does not verify under the fleet key")
    doc = _parse(payload)
    copy = envelope.get("document")
    if copy is not None and copy != doc:
        raise Garbled("assignment envelope: the document copy differs from the signed payload")
    assignment = _typed(doc)
    if assignment.device_id != state.device_id:
        raise ForeignDevice(f"assignment is for device {assignment.device_id[:80]!r}, not {state.device_id!r}")
    if assignment.serial < state.last_serial:
        raise Replayed(f"assignment serial {assignment.serial} is below the accepted {state.last_serial}")
    if not math.isfinite(now) or now >= assignment.expires_at:
        raise Expired(f"assignment serial {assignment.serial} expired at {assignment.expires_at:.0f} "
                      f"(now {now:.0f}); installing nothing until the fleet answers")
    return assignment


def _trusted_key(trusted: bytes | Sequence[bytes], wanted_id: str) -> bytes:
    keys = [trusted] if isinstance(trusted, bytes) else list(trusted)
    for pem in keys:
        try:
            if key_id(pem) == wanted_id:
                return pem
        except ValueError:
            continue  # an unreadable trusted key matches nothing
    raise WrongKey(f"assignment signed by key {wanted_id[:16]}..., which this device does not trust")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse(payload: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(payload.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Garbled(f"assignment payload is not JSON: {str(e)[:120]}") from None
    if not isinstance(doc, dict):
        raise Garbled("assignment payload is not a JSON object")
    if canonical_bytes(doc) != payload:
        raise Garbled("assignment payload is not in canonical form")
    error = best_match(_DOCUMENT.iter_errors(doc))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "document"
        raise Garbled(f"assignment {where}: {error.message[:200]}")
    return doc


def _typed(doc: dict[str, Any]) -> Assignment:
    # JSON Schema counts 6.0 as an integer; the wire format does not.
    integers = [("serial", doc["serial"])] + [(f"{b['name']} {k}", b[k]) for b in doc["bundles"]
                                              for k in ("release", "size")]
    for what, value in integers:
        if type(value) is not int:
            raise Garbled(f"assignment {what}: {value!r} is not an integer")
    bundles = tuple(AssignedBundle(name=b["name"], version=b["version"], ref=b["ref"], release=b["release"],
                                   digest=b["digest"], archive_sha256=b["archive_sha256"], size=b["size"],
                                   url=b["url"], revoked=b["revoked"], constraints=_constraints(b))
                    for b in doc["bundles"])
    for b in bundles:
        if b.ref != f"{b.name}@{b.version}":
            raise Garbled(f"assignment bundle {b.ref[:80]!r}: ref is not name@version")
    names = [b.name for b in bundles]
    if len(set(names)) != len(names):
        raise Garbled("assignment names a bundle twice")
    if doc["expires_at"] < doc["issued_at"]:
        raise Garbled("assignment expires before it was issued")
    return Assignment(device_id=doc["device_id"], serial=doc["serial"], issued_at=float(doc["issued_at"]),
                      expires_at=float(doc["expires_at"]), bundles=bundles, revoked=tuple(doc["revoked"]))


def _constraints(entry: Mapping[str, Any]) -> BundleConstraints | None:
    c = entry.get("constraints")
    if c is None:
        return None
    return BundleConstraints(tuple(c["architectures"]), c.get("min_compute_capability"),
                             tuple(c.get("engines") or ()))
