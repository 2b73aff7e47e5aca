"""Site key history: every key a site held, and the last checkpoint witnessed under it

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "site_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("site_id", sa.String(length=36), nullable=False),
        sa.Column("public_key", sa.String(length=100), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_by", sa.String(length=20), nullable=True),
        sa.Column("last_checkpoint", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_site_keys_site_id"), "site_keys", ["site_id"], unique=False)
    # The keys of sites enrolled before: their current key, held since enrollment (or the last rotation).
    op.execute(
        "INSERT INTO site_keys (site_id, public_key, since) "
        "SELECT id, public_key, COALESCE(key_rotated_at, enrolled_at, created_at) FROM sites "
        "WHERE public_key IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_site_keys_site_id"), table_name="site_keys")
    op.drop_table("site_keys")
