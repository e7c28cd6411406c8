"""Typed errors of the fleet server.

Domain code raises these and never thinks about HTTP; the API's one error
middleware maps each class to its status (``fleet/api/common.py``), and the CLI prints
the message. The tree, grouped by what went wrong::

    FleetError                    root; .message
    ├── InvalidRequest            malformed or out-of-range input        (400)
    ├── Unauthenticated           no, unknown or revoked credential      (401)
    ├── Forbidden                 known principal, not allowed           (403)
    ├── NotFound                  no such device, bundle, token          (404)
    ├── Conflict                  immutable version, revoked bundle      (409)
    ├── Gone                      revoked bundle asked for by a device   (410)
    ├── TooLarge                  body over the limit                    (413)
    ├── RateLimited               enrollment attempts; .retry_after_s    (429)
    ├── Busy                      shedding load; .retry_after_s          (503)
    ├── BundleRejected            failed verification; .reason           (422)
    └── ClientError               the CLI's view of a failed request; .status
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every fleet error; the message is safe to show to a client."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class InvalidRequest(FleetError):
    pass


class Unauthenticated(FleetError):
    pass


class Forbidden(FleetError):
    pass


class NotFound(FleetError):
    pass


class Conflict(FleetError):
    pass


class Gone(FleetError):
    pass


class TooLarge(FleetError):
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        super().__init__(f"body larger than {limit_bytes} bytes")


class RateLimited(FleetError):
    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"too many attempts; retry after {retry_after_s:.0f} s")


class Busy(FleetError):
    """The fleet is shedding load (a cold-start herd): come back after `retry_after_s`, jittered
    per request so that the devices told together do not return together."""

    def __init__(self, retry_after_s: float, what: str) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"fleet busy ({what}); retry after {retry_after_s:.0f} s")


class BundleRejected(FleetError):
    """The bundle failed verification; `reason` is the bundle library's own words."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"bundle rejected: {reason}")


class ClientError(FleetError):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {message}")
