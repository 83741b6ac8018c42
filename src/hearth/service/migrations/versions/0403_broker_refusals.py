"""Connections the broker refused, counted per reason (``hearth.service.broker_log``).

Revision ID: 0403
Revises: 0402
Create Date: 2026-11-25

Frozen like every migration.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0403"
down_revision: str | None = "0402"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "broker_refusals",
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("reason", name="pk_broker_refusals"),
    )


def downgrade() -> None:
    op.drop_table("broker_refusals")
