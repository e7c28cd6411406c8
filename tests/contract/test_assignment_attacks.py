"""Assignment verification against a table of attacks (THREATS 3, 4, 7, 10, 11, 13), python-tuf style.

Every case builds an envelope with the in-memory signer, hands it to the pure
`verify_assignment` with a trusted state, and expects one typed refusal.
Numbered so a failure names the attack.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from contract import (
    AssignmentRejected,
    AssignmentState,
    BadSignature,
    Expired,
    ForeignDevice,
    Garbled,
    Replayed,
    WrongKey,
    verify_assignment,
)
from contract.assignment import MAX_PAYLOAD_CHARS, MAX_SERIAL

from .simulator import DEVICE, NOW, Signer, canonical_bytes, document, mutate

FLEET, OTHER, P384 = Signer(), Signer(), Signer(ec.SECP384R1())
STATE = AssignmentState(DEVICE, last_serial=5, last_issued_at=NOW - 120)
Envelope = dict[str, Any]


def _signed(**kw: Any) -> Envelope:
    return FLEET.envelope(document(**kw))


def _tampered_payload() -> Envelope:
    env = _signed()
    forged = canonical_bytes({**env["document"], "device_id": DEVICE, "serial": 99})
    return {**env, "payload": base64.b64encode(forged).decode(), "document": json.loads(forged)}


def _without(field: str) -> Envelope:
    return FLEET.envelope(mutate(document(), lambda d: d.pop(field)))


def _bundle_edit(fn: Callable[[dict[str, Any]], None]) -> Envelope:
    return FLEET.envelope(mutate(document(), lambda d: fn(d["bundles"][0])))


def _deep() -> Envelope:
    return FLEET.raw(b'{"a":' * 5000 + b"1" + b"}" * 5000)


def _p384_claiming_fleet_key() -> Envelope:
    return {**P384.envelope(document()), "key_id": FLEET.key_id}


CASES: list[tuple[str, Callable[[], Envelope], type[AssignmentRejected]]] = [
    # --- whose document is it (THREATS 10) ---
    ("01 foreign device", lambda: _signed(device_id="dev-2"), ForeignDevice),
    ("02 device id differs only in case", lambda: _signed(device_id=DEVICE.upper()), ForeignDevice),
    # --- rollback and freeze (THREATS 6, 7) ---
    ("03 replayed older serial", lambda: _signed(serial=4), Replayed),
    ("04 replayed serial 0 (factory document)", lambda: _signed(serial=0), Replayed),
    ("05 expired", lambda: _signed(issued_at=NOW - 7200, ttl_s=3600), Expired),
    ("06 expires exactly now", lambda: _signed(issued_at=NOW - 3600, ttl_s=3600), Expired),
    # --- keys (THREATS 3, 11) ---
    ("07 signed by an untrusted key", lambda: OTHER.envelope(document()), WrongKey),
    ("08 untrusted key claiming the fleet's key id", lambda: {**OTHER.envelope(document()), "key_id": FLEET.key_id},
     BadSignature),
    ("09 P-384 key claiming the fleet's key id", _p384_claiming_fleet_key, BadSignature),
    ("10 key id missing", lambda: {k: v for k, v in _signed().items() if k != "key_id"}, Garbled),
    # --- signatures (THREATS 4) ---
    ("11 no signature", lambda: {k: v for k, v in _signed().items() if k != "signature"}, Garbled),
    ("12 empty signature", lambda: {**_signed(), "signature": ""}, Garbled),
    ("13 signature not base64", lambda: {**_signed(), "signature": "!!not base64!!"}, BadSignature),
    ("14 signature over other bytes", lambda: {**_signed(), "signature": FLEET.sign(b"something else")}, BadSignature),
    ("15 signature of another document", lambda: {**_signed(), "signature": _signed(serial=6)["signature"]},
     BadSignature),
    ("16 payload edited after signing", _tampered_payload, BadSignature),
    ("17 signature truncated", lambda: {**_signed(), "signature": _signed()["signature"][:40]}, BadSignature),
    ("18 other algorithm named", lambda: {**_signed(), "algorithm": "none"}, Garbled),
    # --- the envelope and payload as bytes (THREATS 13) ---
    ("19 envelope not an object", lambda: ["payload"], Garbled),  # type: ignore[return-value,list-item]
    ("20 payload not base64", lambda: {**_signed(), "payload": "%%%"}, Garbled),
    ("21 payload base64 with junk", lambda: {**_signed(), "payload": _signed()["payload"] + "*"}, Garbled),
    ("22 payload too long", lambda: {**_signed(), "payload": "A" * (MAX_PAYLOAD_CHARS + 4)}, Garbled),
    ("23 payload not JSON (signed)", lambda: FLEET.raw(b"\x00\xffgarbage"), Garbled),
    ("24 payload a JSON list (signed)", lambda: FLEET.raw(b"[1,2]"), Garbled),
    ("25 payload not canonical (signed)", lambda: FLEET.raw(json.dumps(document(), indent=1).encode()), Garbled),
    ("26 payload with duplicate keys (signed)", lambda: FLEET.raw(
        canonical_bytes(document())[:-1] + b',"serial":99}'), Garbled),
    ("27 payload with NaN (signed)", lambda: FLEET.raw(canonical_bytes(document())[:-1] + b',"x":NaN}'), Garbled),
    ("28 deeply nested payload (signed)", _deep, Garbled),
    ("29 document copy differs from payload", lambda: {**_signed(), "document": {**document(), "serial": 999}},
     Garbled),
    ("30 document copy not an object", lambda: {**_signed(), "document": "hello"}, Garbled),
    # --- the document's fields (signed, so only the format check can refuse them) ---
    *[(f"31 missing {f}", (lambda f=f: _without(f)), Garbled)
      for f in ("type", "format", "device_id", "serial", "issued_at", "expires_at", "bundles", "revoked")],
    ("32 other document type", lambda: _signed(type="outpost.bundle"), Garbled),
    ("33 future format", lambda: _signed(format=2), Garbled),
    ("34 huge serial", lambda: _signed(serial=MAX_SERIAL + 1), Garbled),
    ("35 serial 2^70", lambda: _signed(serial=2**70), Garbled),
    ("36 negative serial", lambda: _signed(serial=-1), Garbled),
    ("37 serial as a float", lambda: _signed(serial=6.0), Garbled),
    ("38 serial as a string", lambda: _signed(serial="6"), Garbled),
    ("39 serial as a boolean", lambda: _signed(serial=True), Garbled),
    ("40 expiry before issue", lambda: _signed(issued_at=NOW, ttl_s=-10), Garbled),
    ("41 expiry far past year 5000", lambda: _signed(ttl_s=1e12), Garbled),
    ("42 bundle url on another host (credential leak)",
     lambda: _bundle_edit(lambda b: b.update(url="https://evil.example/x")), Garbled),
    ("43 bundle url protocol-relative", lambda: _bundle_edit(lambda b: b.update(url="//evil.example/x")), Garbled),
    ("44 bundle ref not name@version", lambda: _bundle_edit(lambda b: b.update(ref="demo@9.9.9")), Garbled),
    ("45 bundle digest not hex", lambda: _bundle_edit(lambda b: b.update(archive_sha256="z" * 64)), Garbled),
    ("46 bundle size zero", lambda: _bundle_edit(lambda b: b.update(size=0)), Garbled),
    ("47 bundle size 2^63", lambda: _bundle_edit(lambda b: b.update(size=2**63)), Garbled),
    ("48 bundle release negative", lambda: _bundle_edit(lambda b: b.update(release=-1)), Garbled),
    ("49 bundle without archive_sha256", lambda: _bundle_edit(lambda b: b.pop("archive_sha256")), Garbled),
    ("50 same bundle name twice", lambda: FLEET.envelope(mutate(
        document(), lambda d: d["bundles"].append({**d["bundles"][0], "version": "9", "ref": "demo@9"}))), Garbled),
    ("51 too many bundles", lambda: FLEET.envelope(mutate(
        document(), lambda d: d.update(bundles=[{**d["bundles"][0], "name": f"m{i}", "ref": f"m{i}@1.0.0"}
                                               for i in range(65)]))), Garbled),
    ("52 bundle name with a path", lambda: _bundle_edit(lambda b: b.update(name="../x", ref="../x@1.0.0")), Garbled),
]


@pytest.mark.parametrize(("name", "make", "expected"), CASES, ids=[c[0] for c in CASES])
def test_attack_is_refused(name: str, make: Callable[[], Envelope], expected: type[AssignmentRejected]) -> None:
    with pytest.raises(expected) as caught:
        verify_assignment(make(), FLEET.public_pem, STATE, NOW)
    assert type(caught.value) is expected, f"{name}: {type(caught.value).__name__}: {caught.value}"
    assert caught.value.message and caught.value.reason


def test_valid_document_is_accepted_as_typed_fields() -> None:
    a = verify_assignment(_signed(serial=6), FLEET.public_pem, STATE, NOW)
    assert (a.device_id, a.serial, a.revoked) == (DEVICE, 6, ("old@0.1.0",))
    demo = a.bundle("demo")
    assert demo is not None and (demo.ref, demo.release, demo.size) == ("demo@1.0.0", 3, 1234)
    assert demo.url == "/api/v1/bundles/demo/1.0.0/archive" and not demo.revoked
    assert a.bundle("nope") is None


def test_same_serial_re_signed_is_accepted_and_state_only_moves_forward() -> None:
    """The fleet re-signs one serial with fresh expiries; an older signing of it is harmless, never a regression."""
    newer = verify_assignment(_signed(serial=5, issued_at=NOW - 10), FLEET.public_pem, STATE, NOW)
    state = STATE.after(newer)
    assert (state.last_serial, state.last_issued_at) == (5, NOW - 10)
    older = verify_assignment(_signed(serial=5, issued_at=NOW - 300), FLEET.public_pem, state, NOW)
    assert state.after(older) == state
    nxt = state.after(verify_assignment(_signed(serial=9), FLEET.public_pem, state, NOW))
    assert nxt.last_serial == 9
    with pytest.raises(Replayed):
        verify_assignment(_signed(serial=8), FLEET.public_pem, nxt, NOW)


def test_fresh_device_accepts_serial_zero() -> None:
    a = verify_assignment(_signed(serial=0), FLEET.public_pem, AssignmentState.initial(DEVICE), NOW)
    assert a.serial == 0


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    a = verify_assignment(FLEET.envelope(document(serial=6, rollout="canary-3")), FLEET.public_pem, STATE, NOW)
    assert a.serial == 6


def test_key_rotation_trusts_every_listed_key_and_no_removed_one() -> None:
    new = Signer()
    both = [FLEET.public_pem, new.public_pem]
    assert verify_assignment(new.envelope(document(serial=6)), both, STATE, NOW).serial == 6
    assert verify_assignment(FLEET.envelope(document(serial=6)), both, STATE, NOW).serial == 6
    with pytest.raises(WrongKey):
        verify_assignment(FLEET.envelope(document(serial=6)), [new.public_pem], STATE, NOW)


def test_unusable_trusted_key_matches_nothing() -> None:
    with pytest.raises(WrongKey):
        verify_assignment(_signed(serial=6), b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n",
                          STATE, NOW)


def test_a_clock_that_is_not_a_number_expires_everything() -> None:
    with pytest.raises(Expired):
        verify_assignment(_signed(serial=6), FLEET.public_pem, STATE, float("nan"))


_FIXED = _signed(serial=6)  # signed once: ECDSA signatures differ in length between signings


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_corruption_is_a_typed_refusal(data: st.DataObject) -> None:
    """Flip bytes anywhere in the payload or signature: a typed refusal, never another exception, never accepted."""
    env = _FIXED
    field = data.draw(st.sampled_from(["payload", "signature"]))
    raw = bytearray(base64.b64decode(env[field]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    assume(bytes(raw) != base64.b64decode(env[field]))  # two flips of one byte can cancel out
    forged = {**env, field: base64.b64encode(bytes(raw)).decode()}
    with pytest.raises(AssignmentRejected):
        verify_assignment(forged, FLEET.public_pem, STATE, NOW)
