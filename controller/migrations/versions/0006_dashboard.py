"""The dashboard: sign-in sessions, the audit log's search index, site history samples

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-06 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ui_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("token_id", sa.String(length=32), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["token_id"], ["api_tokens.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ui_sessions_token_id", "ui_sessions", ["token_id"])
    op.create_index("ix_ui_sessions_expires_at", "ui_sessions", ["expires_at"])
    op.create_table(
        "audit_index",
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=True),
        sa.Column("action", sa.String(length=300), nullable=False),
        sa.Column("resource", sa.String(length=1000), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=True),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("idx"),
    )
    op.create_index("ix_audit_index_actor", "audit_index", ["actor", "idx"])
    op.create_index("ix_audit_index_action", "audit_index", ["action", "idx"])
    op.create_index("ix_audit_index_at", "audit_index", ["at", "idx"])
    op.create_table(
        "audit_index_terms",
        sa.Column("term", sa.String(length=200), nullable=False),
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint("term", "idx"),
    )
    op.create_table(
        "site_samples",
        sa.Column("site_id", sa.String(length=36), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_age_s", sa.BigInteger(), nullable=True),
        sa.Column("checkpoint_size", sa.BigInteger(), nullable=True),
        sa.Column("witnessed_size", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"]),
        sa.PrimaryKeyConstraint("site_id", "at"),
    )
    op.create_index("ix_site_samples_at", "site_samples", ["at"])


def downgrade() -> None:
    op.drop_table("site_samples")
    op.drop_table("audit_index_terms")
    op.drop_table("audit_index")
    op.drop_table("ui_sessions")
