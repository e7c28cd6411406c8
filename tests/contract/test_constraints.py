"""The optional `constraints` of a bundle entry: carried, verified with the document, backwards compatible."""

from __future__ import annotations

from typing import Any

import pytest

from contract import AssignmentState, BundleConstraints, Garbled, bundle_entry, verify_assignment

from .simulator import DEVICE, HEX_A, HEX_B, NOW, Signer, document, mutate

ARM = BundleConstraints(("aarch64",), "7.2", ("tensorrt", "cpu"))


def _verify(signer: Signer, doc: dict[str, Any]) -> Any:
    return verify_assignment(signer.envelope(doc), signer.public_pem, AssignmentState.initial(DEVICE), NOW)


def test_a_document_without_constraints_still_verifies() -> None:
    signer = Signer()
    got = _verify(signer, document())
    assert all(b.constraints is None for b in got.bundles)


def test_constraints_travel_signed() -> None:
    signer = Signer()
    doc = document(bundles=[bundle_entry("demo", "1.0.0", 3, HEX_A, HEX_B, 1234, False, ARM)])
    got = _verify(signer, doc)
    assert got.bundles[0].constraints == ARM
    assert BundleConstraints.from_manifest({"constraints": {"architectures": ["aarch64"],
                                                            "min_compute_capability": "7.2"},
                                            "serving": {"engines": ["tensorrt", "cpu"]}}) == ARM
    assert BundleConstraints.from_manifest({}) is None


@pytest.mark.parametrize("bad", [
    {"architectures": []},
    {"architectures": "x86_64"},
    {"min_compute_capability": "7.5"},
    {"architectures": ["x86_64"], "min_compute_capability": "seven"},
    {"architectures": ["x86_64"], "engines": []},
    {"architectures": ["x86_64"], "engines": [3]},
    "x86_64",
])
def test_garbled_constraints_are_refused(bad: Any) -> None:
    signer = Signer()
    entry = bundle_entry("demo", "1.0.0", 3, HEX_A, HEX_B, 1234, False)
    doc = mutate(document(bundles=[entry]), lambda d: d["bundles"][0].__setitem__("constraints", bad))
    with pytest.raises(Garbled):
        _verify(signer, doc)
