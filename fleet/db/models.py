"""The fleet's schema: one set of SQLAlchemy tables for SQLite and PostgreSQL.

Times are epoch seconds in floats so that both databases store and compare
them the same way; JSON columns hold documents the server never queries into
(labels and bundle membership that *are* queried have their own tables).
Changing a table means a new Alembic revision in `fleet/migrations/versions`;
a test compares this metadata with the migrated database.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class OperatorToken(Base):
    __tablename__ = "operator_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class EnrollToken(Base):
    __tablename__ = "enroll_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    uses_left: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float] = mapped_column(Float)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_by: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[float] = mapped_column(Float)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True)
    enrolled_at: Mapped[float] = mapped_column(Float)
    #: Grows by one on every change of what the device should run (never reused).
    assignment_serial: Mapped[int] = mapped_column(Integer, default=0)
    assignment_changed_at: Mapped[float] = mapped_column(Float, index=True)
    last_seen_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Latest heartbeat as received (agent version, hardware, bundles, health).
    state: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: Digest of the installed-bundle list last recorded in `device_bundles`: lets the
    #: common report (nothing installed changed) skip rewriting that table.
    bundles_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)


class DeviceLabel(Base):
    __tablename__ = "device_labels"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
    __table_args__ = (Index("ix_device_labels_kv", "key", "value"),)


class Bundle(Base):
    __tablename__ = "bundles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    release: Mapped[int] = mapped_column(Integer)
    #: sha256 of the signed manifest: the bundle's identity, independent of packing.
    digest: Mapped[str] = mapped_column(String(64))
    #: sha256 of the stored archive: the blob's address and the download ETag.
    archive_sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    signer: Mapped[str] = mapped_column(String(200))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    pushed_at: Mapped[float] = mapped_column(Float)
    pushed_by: Mapped[str] = mapped_column(String(32))
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoke_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    __table_args__ = (UniqueConstraint("name", "version", name="uq_bundles_name_version"),)


class AssignmentItem(Base):
    __tablename__ = "assignment_items"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id", ondelete="CASCADE"), primary_key=True,
                                           index=True)


class DeviceBundle(Base):
    """What each device last said it has installed, so a revocation can find it."""

    __tablename__ = "device_bundles"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    ref: Mapped[str] = mapped_column(String(200), primary_key=True, index=True)
    active: Mapped[bool] = mapped_column(Boolean, default=False)


class Revocation(Base):
    """Credentials withdrawn recently, so every fleet process can drop them from its cache."""

    __tablename__ = "revocations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: "device" (subject = device id) or "token" (subject = token hash)
    kind: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(64))
    at: Mapped[float] = mapped_column(Float, index=True)


class TelemetryPoint(Base):
    __tablename__ = "telemetry"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    #: Window end, epoch seconds.
    ts: Mapped[float] = mapped_column(Float)
    #: Length of the window the point stands for: a raw window, or a downsampled bucket.
    resolution_s: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    __table_args__ = (
        Index("ix_telemetry_device_ts", "device_id", "ts"),
        Index("ix_telemetry_resolution_ts", "resolution_s", "ts"),
    )


class Rollout(Base):
    """A staged rollout of one bundle version; the pure machine's state plus the lease that guards it.

    `version` grows by one with every change (compare-and-swap: a write names the
    version it read); `lease_owner`/`lease_until` say which fleet process runs the
    rollout's engine now, so two processes never both act on it.
    """

    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    bundle_name: Mapped[str] = mapped_column(String(128), index=True)
    bundle_version: Mapped[str] = mapped_column(String(64))
    #: Selector, stages and resolved gates, as created (never changes).
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[int] = mapped_column(Integer, default=0)
    stage_started_at: Mapped[float] = mapped_column(Float)
    failed_evaluations: Mapped[int] = mapped_column(Integer, default=0)
    #: Why the rollout waits or stopped, in words (shown beside the status).
    reason: Mapped[str] = mapped_column(Text, default="")
    #: The latest gate evaluation, for the dashboard and `rollout show`.
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[float] = mapped_column(Float)
    version: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    #: Final and every device's assignment matches it: no process needs to look at it again.
    settled: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


class RolloutDevice(Base):
    """One device taken into a rollout: when, in which stage, and what it ran before."""

    __tablename__ = "rollout_devices"
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True,
                                           index=True)
    stage: Mapped[int] = mapped_column(Integer)
    hardware: Mapped[str] = mapped_column(String(200))
    #: The version of the same bundle it was assigned before (rollback target); None: none.
    previous_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    assigned_at: Mapped[float] = mapped_column(Float)
    #: First time it reported the new version active.
    converged_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Telemetry of the replaced version on this device just before the switch (gate baseline).
    baseline: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)


class RolloutEvent(Base):
    """The audit log: every decision and operator action, with the figures behind it."""

    __tablename__ = "rollout_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), index=True)
    at: Mapped[float] = mapped_column(Float)
    #: "engine:<process>" or the operator token id.
    actor: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(32))
    stage: Mapped[int] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
