"""Initial schema: units, telemetry, events, quarantine, counters, commands, API tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Migrations are frozen: they use plain SQLAlchemy types, never the application's models,
so later changes to ``models.py`` cannot rewrite history. (``UTCDateTime`` is a
``DateTime(timezone=True)`` at the database level.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _big_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "units",
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(32), nullable=False),
        sa.Column("certificate_pem", sa.Text(), nullable=False),
        sa.Column("cert_serial", sa.String(64), nullable=False),
        sa.Column("mqtt_password_hash", _json(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("imported_at", _ts(), nullable=False),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.Column("last_seen_at", _ts(), nullable=True),
        sa.Column("latest_seq", sa.BigInteger(), nullable=True),
        sa.Column("latest_ts", _ts(), nullable=True),
        sa.Column("latest_state", _json(), nullable=False),
        sa.CheckConstraint("status IN ('active', 'revoked')", name=op.f("ck_units_status")),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_units")),
    )
    op.create_index(op.f("ix_units_cert_serial"), "units", ["cert_serial"])

    for table in ("telemetry", "events"):
        payload = (
            [sa.Column("readings", _json(), nullable=False)]
            if table == "telemetry"
            else [
                sa.Column("kind", sa.String(32), nullable=False),
                sa.Column("detail", sa.String(256), nullable=False),
            ]
        )
        op.create_table(
            table,
            sa.Column("id", _big_id(), autoincrement=True, nullable=False),
            sa.Column("device_id", sa.String(32), nullable=False),
            sa.Column("seq", sa.BigInteger(), nullable=False),
            sa.Column("ts", _ts(), nullable=False),
            sa.Column("received_at", _ts(), nullable=False),
            *payload,
            sa.Column("digest", sa.String(64), nullable=False),
            sa.ForeignKeyConstraint(
                ["device_id"], ["units.device_id"],
                name=op.f(f"fk_{table}_device_id_units"), ondelete="CASCADE",
            ),
            sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
            sa.UniqueConstraint("device_id", "seq", name=op.f(f"uq_{table}_device_id_seq")),
        )
        op.create_index(op.f(f"ix_{table}_device_id_ts"), table, ["device_id", "ts"])

    op.create_table(
        "quarantine",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(32), nullable=True),
        sa.Column("topic", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(256), nullable=False),
        sa.Column("payload_size", sa.Integer(), nullable=False),
        sa.Column("payload_excerpt", sa.Text(), nullable=False),
        sa.Column("received_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantine")),
    )
    op.create_index(op.f("ix_quarantine_device_id"), "quarantine", ["device_id"])
    op.create_index(op.f("ix_quarantine_received_at"), "quarantine", ["received_at"])

    op.create_table(
        "ingest_counters",
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "reason", name=op.f("pk_ingest_counters")),
    )

    op.create_table(
        "commands",
        sa.Column("command_id", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("params", _json(), nullable=False),
        sa.Column("issued_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result", _json(), nullable=True),
        sa.Column("completed_at", _ts(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'succeeded', 'rejected', 'failed', 'expired')",
            name=op.f("ck_commands_status"),
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["units.device_id"],
            name=op.f("fk_commands_device_id_units"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("command_id", name=op.f("pk_commands")),
    )
    op.create_index(
        op.f("ix_commands_device_id_issued_at"), "commands", ["device_id", "issued_at"]
    )
    op.create_index(op.f("ix_commands_status_expires_at"), "commands", ["status", "expires_at"])

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("permissions", _json(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
    )


def downgrade() -> None:
    for table in ("api_tokens", "commands", "ingest_counters", "quarantine", "events",
                  "telemetry", "units"):
        op.drop_table(table)
