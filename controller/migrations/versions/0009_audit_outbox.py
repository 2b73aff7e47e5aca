"""The controller's audit trail: the outbox, the checkpoint history and the sites' cosignatures

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_outbox",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sqlite_autoincrement=True,  # seqs are never reused, even once moved rows are deleted
    )
    op.create_table(
        "audit_outbox_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("log_size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.String(length=64), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("size"),
    )
    op.create_table(
        "log_cosignatures",
        sa.Column("site_id", sa.String(length=36), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("witness_vkey", sa.String(length=200), nullable=False),
        sa.Column("line", sa.Text(), nullable=False),
        sa.Column("timestamp", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"]),
        sa.PrimaryKeyConstraint("site_id"),
    )
    op.create_index(op.f("ix_log_cosignatures_size"), "log_cosignatures", ["size"], unique=False)
    with op.batch_alter_table("observed_states") as batch:
        batch.add_column(sa.Column("previous_desired_version", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("previous_artifacts", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("observed_states") as batch:
        batch.drop_column("previous_artifacts")
        batch.drop_column("previous_desired_version")
    op.drop_index(op.f("ix_log_cosignatures_size"), table_name="log_cosignatures")
    op.drop_table("log_cosignatures")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_outbox_state")
    op.drop_table("audit_outbox")
