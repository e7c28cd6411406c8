"""Typed errors of the agent's link to its fleet (client, downloads, credentials).

Foreign errors (aiohttp, OSError, timeouts) are translated once, in the
transport, and chained with ``from``. The tree, grouped by origin as in
python-tuf (the fleet said no / the link failed / the bytes were wrong)::

    FleetLinkError                  root (an AgentError, so the CLI prints its message)
    ├── FleetUnreachable            no answer: refused, reset, DNS, TLS, timeout (also a ConnectionError)
    ├── FleetRejected               the fleet answered with an error; .status, .message
    │   └── AuthFailed              401/403: credential unknown, revoked or not allowed
    ├── DownloadError               a bundle download failed; nothing was stored
    │   ├── DownloadStalled         below the minimum throughput, or no byte for a chunk timeout (retryable)
    │   ├── DownloadTooLarge        more bytes than the document declared (not retried)
    │   └── DownloadHashMismatch    the complete file's sha256 is not the declared one (not retried)
    └── CredentialError             the credential file is missing, unreadable, too open or malformed
"""

from __future__ import annotations

from .errors import AgentError


class FleetLinkError(AgentError):
    status = 502


class FleetUnreachable(FleetLinkError, ConnectionError):
    pass


class FleetRejected(FleetLinkError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"fleet answered HTTP {status}: {message}")
        self.status = status
        self.reason = message

    @property
    def retryable(self) -> bool:
        """Worth trying again later (the fleet is overloaded or broken), not a refusal of this request."""
        return self.status == 429 or self.status >= 500


class AuthFailed(FleetRejected):
    pass


class DownloadError(FleetLinkError):
    pass


class DownloadStalled(DownloadError, TimeoutError):
    pass


class DownloadTooLarge(DownloadError):
    def __init__(self, url: str, limit_bytes: int) -> None:
        super().__init__(f"{url}: more than the declared {limit_bytes} bytes; refused")
        self.limit_bytes = limit_bytes


class DownloadHashMismatch(DownloadError):
    def __init__(self, url: str, expected: str, actual: str) -> None:
        super().__init__(f"{url}: sha256 {actual[:16]}... is not the declared {expected[:16]}...; refused")
        self.expected = expected
        self.actual = actual


class CredentialError(FleetLinkError):
    status = 500
