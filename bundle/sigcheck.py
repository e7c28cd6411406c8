"""Run the signature check in a short-lived child process.

The OMS stack (model-signing, sigstore, tuf, pydantic) costs a long-lived
server about 26 MiB of resident memory that it never gives back, for a check
it runs once per bundle. `verify(..., isolate_signature=True)` runs only that
step here, in a child interpreter that exits afterwards; the file checks (set
equality, sizes, hashes, external data) stay in the caller, so what the caller
loads is what the caller hashed. Typed errors cross the process boundary by
class name and come back as the same `BundleError` subclasses.

Child protocol: `python -m bundle.sigcheck` reads a JSON request on stdin and
prints one JSON line: {"digests": {path: [algorithm, hex]}, "anchor": index}
or {"error": {"type": ClassName, "path": ..., "reason": ...}}.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from . import errors
from .oms import CertificateAnchor, KeyAnchor, SignedDigest, TrustAnchor, signed_digests

#: the child only parses one small file and checks one signature
CHILD_TIMEOUT_S = 120.0


def _encode_anchor(anchor: TrustAnchor) -> dict[str, Any]:
    if isinstance(anchor, KeyAnchor):
        return {"key": str(anchor.public_key)}
    return {"chain": [str(c) for c in anchor.chain]}


def _decode_anchor(doc: dict[str, Any]) -> TrustAnchor:
    if "key" in doc:
        return KeyAnchor(pathlib.Path(doc["key"]))
    return CertificateAnchor(tuple(pathlib.Path(c) for c in doc["chain"]))


def signed_digests_isolated(
    sig_path: str | pathlib.Path, anchors: Sequence[TrustAnchor]
) -> tuple[dict[str, SignedDigest], TrustAnchor]:
    """`oms.signed_digests`, computed in a child process."""
    request = json.dumps({"sig": str(sig_path), "anchors": [_encode_anchor(a) for a in anchors]})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bundle.sigcheck"], input=request, capture_output=True, text=True,
            timeout=CHILD_TIMEOUT_S, check=False,
        )
    except subprocess.TimeoutExpired:
        raise errors.SignatureError(str(sig_path), f"signature check took longer than {CHILD_TIMEOUT_S} s") from None
    try:
        reply = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise errors.SignatureError(
            str(sig_path), f"signature check process failed (exit {proc.returncode}): {detail}"
        ) from None
    if "error" in reply:
        err = reply["error"]
        cls = getattr(errors, err["type"], None)
        if not (isinstance(cls, type) and issubclass(cls, errors.BundleError)) or cls is errors.ManifestSchemaError:
            cls = errors.SignatureError
        raise cls(err["path"], err["reason"])
    digests = {rel: SignedDigest(alg, hexd) for rel, (alg, hexd) in reply["digests"].items()}
    return digests, anchors[int(reply["anchor"])]


def _child() -> None:
    request = json.loads(sys.stdin.read())
    anchors = [_decode_anchor(a) for a in request["anchors"]]
    try:
        digests, anchor = signed_digests(request["sig"], anchors)
    except errors.BundleError as e:
        print(json.dumps({"error": {"type": type(e).__name__, "path": e.path, "reason": e.reason}}))
        return
    print(json.dumps({"digests": {rel: [d.algorithm, d.hex] for rel, d in digests.items()},
                      "anchor": anchors.index(anchor)}))


if __name__ == "__main__":
    _child()
