"""Outpost's unit of delivery: the signed model bundle.

Shared by the agent and the fleet server, so it stays small and has no server
dependencies. The public surface is re-exported here; nothing else in Outpost
imports this package's internals.
"""

from . import errors
from .archive import pack, unpack
from .builder import BuildOptions, build, read_signature, sample_warnings
from .errors import BundleError
from .fsutil import atomic_write_bytes, atomic_writer, fsync_dir
from .hashing import sha256_file
from .keys import fingerprint
from .keys import generate as generate_keys
from .manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Batching,
    Constraints,
    CustomMetric,
    Manifest,
    ModelEntry,
    Service,
    Serving,
    Slo,
    TensorSource,
    TensorSpec,
    tensor_spec,
)
from .manifest import load as load_manifest
from .manifest import parse as parse_manifest
from .oms import CertificateAnchor, KeyAnchor, TrustAnchor, sign_directory
from .verifier import UNVERIFIED, VerifiedBundle, VerifiedFile, anchors, load_unverified, verify

__all__ = [
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "UNVERIFIED",
    "Batching",
    "BuildOptions",
    "BundleError",
    "CertificateAnchor",
    "Constraints",
    "CustomMetric",
    "KeyAnchor",
    "Manifest",
    "ModelEntry",
    "Service",
    "Serving",
    "Slo",
    "TensorSource",
    "TensorSpec",
    "TrustAnchor",
    "VerifiedBundle",
    "VerifiedFile",
    "anchors",
    "atomic_write_bytes",
    "atomic_writer",
    "build",
    "errors",
    "fingerprint",
    "fsync_dir",
    "generate_keys",
    "load_manifest",
    "load_unverified",
    "pack",
    "parse_manifest",
    "read_signature",
    "sample_warnings",
    "sha256_file",
    "sign_directory",
    "tensor_spec",
    "unpack",
    "verify",
]
