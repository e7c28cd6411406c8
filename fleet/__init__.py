"""Outpost's fleet server: model store, device register, signed assignments, telemetry.

Talks to agents over HTTP only (it never imports `agent/` or `engines/`) and
shares the bundle format with them through `bundle/`. Exported here: the
configuration objects, the error root, and what an agent needs to check an
assignment document (`canonical_bytes`, `verify_signature`; the format is in
`fleet.assignments`). The server is run through `fleet.server` or the
`outpost fleet` commands (`fleet.commands`).
"""

from . import errors
from .config import ClientConfig, RetentionConfig, ServerConfig
from .errors import FleetError
from .signing import canonical_bytes, verify_signature

__all__ = ["ClientConfig", "FleetError", "RetentionConfig", "ServerConfig", "canonical_bytes", "errors",
           "verify_signature"]
