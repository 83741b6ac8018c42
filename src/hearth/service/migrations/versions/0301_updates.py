"""Signed updates: releases, rollouts and their units, unit update state and preference,
support periods, integrity alerts, the event cursor of the update monitor.

Revision ID: 0301
Revises: 0201
Create Date: 2026-11-26

Frozen like every migration: plain SQLAlchemy types, not the application's models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0301"
down_revision: str | None = "0201"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ROLLOUT = ("active", "paused", "halted", "completed", "cancelled")
_ROLLOUT_UNIT = ("offered", "installed", "failed", "rolled_back")


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _big_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def upgrade() -> None:
    op.create_table(
        "update_releases",
        sa.Column("target_name", sa.String(128), nullable=False),
        sa.Column("model", sa.String(32), nullable=False),
        sa.Column("version", sa.String(20), nullable=False),
        sa.Column("min_from_version", sa.String(20), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("published_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("target_name", name=op.f("pk_update_releases")),
    )
    op.create_index(op.f("ix_update_releases_model"), "update_releases", ["model"])

    op.create_table(
        "update_rollouts",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("target_name", sa.String(128), nullable=False),
        sa.Column("model", sa.String(32), nullable=False),
        sa.Column("version", sa.String(20), nullable=False),
        sa.Column("stages", _json(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("failure_threshold", sa.Double(), nullable=False),
        sa.Column("min_sample", sa.Integer(), nullable=False),
        sa.Column("auto_advance", sa.Boolean(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("status_reason", sa.String(256), nullable=False),
        sa.CheckConstraint(f"status IN ({_in(_ROLLOUT)})", name=op.f("ck_update_rollouts_status")),
        sa.ForeignKeyConstraint(
            ["target_name"], ["update_releases.target_name"], ondelete="RESTRICT",
            name=op.f("fk_update_rollouts_target_name_update_releases")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_update_rollouts")),
    )
    op.create_index(op.f("ix_update_rollouts_target_name"), "update_rollouts", ["target_name"])
    op.create_index(op.f("ix_update_rollouts_status"), "update_rollouts", ["status"])

    op.create_table(
        "update_rollout_units",
        sa.Column("rollout_id", sa.String(16), nullable=False),
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("detail", sa.String(256), nullable=False),
        sa.Column("offered_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.CheckConstraint(f"status IN ({_in(_ROLLOUT_UNIT)})",
                           name=op.f("ck_update_rollout_units_status")),
        sa.ForeignKeyConstraint(["rollout_id"], ["update_rollouts.id"], ondelete="CASCADE",
                                name=op.f("fk_update_rollout_units_rollout_id_update_rollouts")),
        sa.ForeignKeyConstraint(["device_id"], ["units.device_id"], ondelete="CASCADE",
                                name=op.f("fk_update_rollout_units_device_id_units")),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name=op.f("pk_update_rollout_units")),
    )
    op.create_index(op.f("ix_update_rollout_units_device_id"), "update_rollout_units",
                    ["device_id"])
    op.create_index(op.f("ix_update_rollout_units_rollout_id_stage_status"),
                    "update_rollout_units", ["rollout_id", "stage", "status"])

    op.create_table(
        "update_unit_state",
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("version", sa.String(20), nullable=True),
        sa.Column("running", sa.String(20), nullable=True),
        sa.Column("mode", sa.String(16), nullable=True),
        sa.Column("last_check_at", _ts(), nullable=True),
        sa.Column("last_event", sa.String(32), nullable=True),
        sa.Column("last_event_detail", sa.String(256), nullable=True),
        sa.Column("last_event_at", _ts(), nullable=True),
        sa.Column("automatic", sa.Boolean(), nullable=False),
        sa.Column("window_start", sa.Integer(), nullable=True),
        sa.Column("window_end", sa.Integer(), nullable=True),
        sa.Column("window_tz", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["units.device_id"], ondelete="CASCADE",
                                name=op.f("fk_update_unit_state_device_id_units")),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_update_unit_state")),
    )

    op.create_table(
        "update_support_periods",
        sa.Column("model", sa.String(32), nullable=False),
        sa.Column("end_date", sa.Date(), nullable=False),
        sa.Column("published_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_update_support_periods")),
    )

    op.create_table(
        "update_integrity_alerts",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(256), nullable=False),
        sa.Column("first_seen_at", _ts(), nullable=False),
        sa.Column("last_seen_at", _ts(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("acknowledged_at", _ts(), nullable=True),
        sa.Column("acknowledged_by", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["units.device_id"], ondelete="CASCADE",
                                name=op.f("fk_update_integrity_alerts_device_id_units")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_update_integrity_alerts")),
    )
    op.create_index(op.f("ix_update_integrity_alerts_device_id"), "update_integrity_alerts",
                    ["device_id"])

    op.create_table(
        "update_event_cursor",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_update_event_cursor")),
    )


def downgrade() -> None:
    for table in ("update_event_cursor", "update_integrity_alerts", "update_support_periods",
                  "update_unit_state", "update_rollout_units", "update_rollouts",
                  "update_releases"):
        op.drop_table(table)
