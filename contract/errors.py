"""Typed refusals of the agent-fleet wire contract.

Grouped by what was refused, so a device can report the reason and the fleet
can answer with a 400 naming the problem; neither side ever maps these to a
transport status inside this package::

    ContractError                  root; .message
    ├── AssignmentRejected         an assignment envelope the device must not act on
    │   ├── Garbled                not an envelope/document of this format (bad JSON, base64,
    │   │                          missing or out-of-range fields, copy differing from payload)
    │   ├── WrongKey               names another key than the fleet key the device trusts
    │   ├── BadSignature           the signature does not cover these payload bytes under that key
    │   ├── ForeignDevice          signed for another device
    │   ├── Replayed               serial below the highest the device accepted
    │   └── Expired                past its expiry (freeze attack): install nothing new
    └── ReportInvalid              a report that does not match the report schema; .where
"""

from __future__ import annotations


class ContractError(Exception):
    """Root of the contract's errors; the message is safe to log and to report."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class AssignmentRejected(ContractError):
    """The device installs nothing from this document; `reason` is a short stable code for reports."""

    reason = "rejected"


class Garbled(AssignmentRejected):
    reason = "garbled"


class WrongKey(AssignmentRejected):
    reason = "wrong_key"


class BadSignature(AssignmentRejected):
    reason = "bad_signature"


class ForeignDevice(AssignmentRejected):
    reason = "foreign_device"


class Replayed(AssignmentRejected):
    reason = "replayed"


class Expired(AssignmentRejected):
    reason = "expired"


class ReportInvalid(ContractError):
    """`where` is the JSON path of the first problem (``body`` for the whole report)."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")
