"""Rollouts: staged rollouts with their lease, the devices taken in, and the audit log.

Revision ID: r12_rollouts
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = 'r12_rollouts'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rollouts',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('bundle_name', sa.String(length=128), nullable=False),
    sa.Column('bundle_version', sa.String(length=64), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('stage', sa.Integer(), nullable=False),
    sa.Column('stage_started_at', sa.Float(), nullable=False),
    sa.Column('failed_evaluations', sa.Integer(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('evaluation', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('created_by', sa.String(length=32), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_until', sa.Float(), nullable=False),
    sa.Column('settled', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rollouts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rollouts_bundle_name'), ['bundle_name'], unique=False)
        batch_op.create_index(batch_op.f('ix_rollouts_settled'), ['settled'], unique=False)
        batch_op.create_index(batch_op.f('ix_rollouts_status'), ['status'], unique=False)

    op.create_table('rollout_devices',
    sa.Column('rollout_id', sa.String(length=32), nullable=False),
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('stage', sa.Integer(), nullable=False),
    sa.Column('hardware', sa.String(length=200), nullable=False),
    sa.Column('previous_ref', sa.String(length=200), nullable=True),
    sa.Column('assigned_at', sa.Float(), nullable=False),
    sa.Column('converged_at', sa.Float(), nullable=True),
    sa.Column('baseline', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['rollout_id'], ['rollouts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('rollout_id', 'device_id')
    )
    with op.batch_alter_table('rollout_devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rollout_devices_device_id'), ['device_id'], unique=False)

    op.create_table('rollout_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('rollout_id', sa.String(length=32), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('actor', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('stage', sa.Integer(), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['rollout_id'], ['rollouts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rollout_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rollout_events_rollout_id'), ['rollout_id'], unique=False)


def downgrade() -> None:
    op.drop_table('rollout_events')
    op.drop_table('rollout_devices')
    op.drop_table('rollouts')
