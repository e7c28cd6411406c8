"""The agent-fleet wire contract, shared by both sides and by nothing else.

Pure: no I/O, no HTTP, no database; only `cryptography` and `jsonschema`. The
agent imports it to verify what the fleet sends and to build what it reports;
the fleet imports it to sign and to validate, so the two can never disagree
about a byte of the format.

    assignment    the signed assignment document: format, canonical bytes, the fleet's `seal`,
                  the device's `verify_assignment` over a trusted `AssignmentState`
    report        the report schema (`SCHEMAS`, `validate_report`) and typed builders
    errors        ContractError -> AssignmentRejected (Garbled, WrongKey, BadSignature, ForeignDevice,
                  Replayed, Expired) and ReportInvalid
"""

from . import assignment, errors, report
from .assignment import (
    ALGORITHM,
    DOCUMENT_FORMAT,
    DOCUMENT_TYPE,
    AssignedBundle,
    Assignment,
    AssignmentState,
    BundleConstraints,
    build_document,
    bundle_entry,
    canonical_bytes,
    key_id,
    seal,
    verify_assignment,
    verify_signature,
)
from .errors import (
    AssignmentRejected,
    BadSignature,
    ContractError,
    Expired,
    ForeignDevice,
    Garbled,
    Replayed,
    ReportInvalid,
    WrongKey,
)
from .report import Event, Health, ModelState, ModelStats, TelemetryWindow, build_report, validate_report

__all__ = [
    "ALGORITHM", "DOCUMENT_FORMAT", "DOCUMENT_TYPE", "AssignedBundle", "Assignment", "AssignmentRejected",
    "AssignmentState", "BadSignature", "BundleConstraints", "ContractError", "Event", "Expired", "ForeignDevice",
    "Garbled", "Health",
    "ModelState", "ModelStats", "Replayed", "ReportInvalid", "TelemetryWindow", "WrongKey", "assignment",
    "build_document", "build_report", "bundle_entry", "canonical_bytes", "errors", "key_id", "report", "seal",
    "validate_report", "verify_assignment", "verify_signature",
]
