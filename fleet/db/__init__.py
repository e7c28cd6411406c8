"""Storage of the fleet: schema, engine set-up and migrations."""

from .engine import Database, open_database
from .models import (
    AssignmentItem,
    Base,
    Bundle,
    Device,
    DeviceBundle,
    DeviceLabel,
    EnrollToken,
    OperatorToken,
    Revocation,
    Rollout,
    RolloutDevice,
    RolloutEvent,
    TelemetryPoint,
)

__all__ = [
    "AssignmentItem", "Base", "Bundle", "Database", "Device", "DeviceBundle", "DeviceLabel", "EnrollToken",
    "OperatorToken", "Revocation", "Rollout", "RolloutDevice", "RolloutEvent", "TelemetryPoint", "open_database",
]
