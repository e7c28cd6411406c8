"""Initial schema: tokens, devices, labels, bundles, assignments, telemetry.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('bundles',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('release', sa.Integer(), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('archive_sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('signer', sa.String(length=200), nullable=False),
    sa.Column('manifest', sa.JSON(), nullable=False),
    sa.Column('pushed_at', sa.Float(), nullable=False),
    sa.Column('pushed_by', sa.String(length=32), nullable=False),
    sa.Column('revoked_at', sa.Float(), nullable=True),
    sa.Column('revoke_reason', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', 'version', name='uq_bundles_name_version')
    )
    op.create_table('devices',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('credential_hash', sa.String(length=64), nullable=False),
    sa.Column('enrolled_at', sa.Float(), nullable=False),
    sa.Column('assignment_serial', sa.Integer(), nullable=False),
    sa.Column('assignment_changed_at', sa.Float(), nullable=False),
    sa.Column('last_seen_at', sa.Float(), nullable=True),
    sa.Column('state', sa.JSON(), nullable=True),
    sa.Column('bundles_digest', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('credential_hash')
    )
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_devices_assignment_changed_at'), ['assignment_changed_at'], unique=False)

    op.create_table('enroll_tokens',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('uses_left', sa.Integer(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('created_by', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_table('operator_tokens',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('revoked_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_table('assignment_items',
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('bundle_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['bundle_id'], ['bundles.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('device_id', 'bundle_id')
    )
    with op.batch_alter_table('assignment_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_assignment_items_bundle_id'), ['bundle_id'], unique=False)

    op.create_table('device_bundles',
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('ref', sa.String(length=200), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('device_id', 'ref')
    )
    with op.batch_alter_table('device_bundles', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_bundles_ref'), ['ref'], unique=False)

    op.create_table('device_labels',
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('key', sa.String(length=63), nullable=False),
    sa.Column('value', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('device_id', 'key')
    )
    with op.batch_alter_table('device_labels', schema=None) as batch_op:
        batch_op.create_index('ix_device_labels_kv', ['key', 'value'], unique=False)

    op.create_table('revocations',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('subject', sa.String(length=64), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('revocations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_revocations_at'), ['at'], unique=False)

    op.create_table('telemetry',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('device_id', sa.String(length=32), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('resolution_s', sa.Integer(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('telemetry', schema=None) as batch_op:
        batch_op.create_index('ix_telemetry_device_ts', ['device_id', 'ts'], unique=False)
        batch_op.create_index('ix_telemetry_resolution_ts', ['resolution_s', 'ts'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('telemetry', schema=None) as batch_op:
        batch_op.drop_index('ix_telemetry_resolution_ts')
        batch_op.drop_index('ix_telemetry_device_ts')

    op.drop_table('telemetry')
    with op.batch_alter_table('revocations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_revocations_at'))

    op.drop_table('revocations')
    with op.batch_alter_table('device_labels', schema=None) as batch_op:
        batch_op.drop_index('ix_device_labels_kv')

    op.drop_table('device_labels')
    with op.batch_alter_table('device_bundles', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_bundles_ref'))

    op.drop_table('device_bundles')
    with op.batch_alter_table('assignment_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_assignment_items_bundle_id'))

    op.drop_table('assignment_items')
    op.drop_table('operator_tokens')
    op.drop_table('enroll_tokens')
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_devices_assignment_changed_at'))

    op.drop_table('devices')
    op.drop_table('bundles')
