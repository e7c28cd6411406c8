"""Outpost's fleet server: model store, device register, signed assignments, telemetry.

Talks to agents over HTTP only (it never imports `agent/` or `engines/`) and
shares the bundle format with them through `bundle/`. Exported here: the
configuration objects and the error root (`canonical_bytes` and
`verify_signature` are re-exported from `contract`, where the assignment format
and its verification live, shared with the agent). The server is run through
`fleet.server` or the `outpost fleet` commands (`fleet.commands`).
"""

from contract import canonical_bytes, verify_signature

from . import errors
from .config import ClientConfig, RetentionConfig, ServerConfig
from .errors import FleetError

__all__ = ["ClientConfig", "FleetError", "RetentionConfig", "ServerConfig", "canonical_bytes", "errors",
           "verify_signature"]
