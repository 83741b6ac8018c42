"""Telemetry rows are keyed by what identifies them: (device_id, seq).

The surrogate ``id`` (a sequence and a second unique index beside the unique
``(device_id, seq)``) was never read: history pages by ``seq``. Dropping it saves a
sequence call, an index entry and 8 bytes per row on the hottest table; the unique
constraint becomes the primary key. Events keep their ``id``: the rollout and claim
watchers read them in ``id`` order.

Revision ID: 0402
Revises: 0401
Create Date: 2026-11-25

Frozen like every migration.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0402"
down_revision: str | None = "0401"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE telemetry DROP CONSTRAINT pk_telemetry")
        op.execute("ALTER TABLE telemetry DROP COLUMN id")
        # the unique index already holds every key: it becomes the primary key's index
        op.execute("ALTER TABLE telemetry DROP CONSTRAINT uq_telemetry_device_id_seq")
        op.execute("ALTER TABLE telemetry ADD CONSTRAINT pk_telemetry "
                   "PRIMARY KEY (device_id, seq)")
        return
    with op.batch_alter_table("telemetry", recreate="always") as batch:
        batch.drop_constraint("uq_telemetry_device_id_seq", type_="unique")
        batch.drop_constraint("pk_telemetry", type_="primary")
        batch.drop_column("id")
        batch.create_primary_key("pk_telemetry", ["device_id", "seq"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE telemetry DROP CONSTRAINT pk_telemetry")
        op.execute("ALTER TABLE telemetry ADD CONSTRAINT uq_telemetry_device_id_seq "
                   "UNIQUE (device_id, seq)")
        op.execute("ALTER TABLE telemetry ADD COLUMN id BIGSERIAL")
        op.execute("ALTER TABLE telemetry ADD CONSTRAINT pk_telemetry PRIMARY KEY (id)")
        return
    # SQLite: rebuild the table as revision 0001 created it; ids are numbered anew
    op.drop_index("ix_telemetry_device_id_ts", table_name="telemetry")
    op.rename_table("telemetry", "_telemetry_0402")
    op.create_table(
        "telemetry",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("readings", sa.JSON(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["units.device_id"],
                                name="fk_telemetry_device_id_units", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_telemetry"),
        sa.UniqueConstraint("device_id", "seq", name="uq_telemetry_device_id_seq"),
    )
    op.execute("INSERT INTO telemetry (device_id, seq, ts, received_at, readings, digest) "
               "SELECT device_id, seq, ts, received_at, readings, digest FROM _telemetry_0402 "
               "ORDER BY received_at, device_id, seq")
    op.drop_table("_telemetry_0402")
    op.create_index("ix_telemetry_device_id_ts", "telemetry", ["device_id", "ts"])
