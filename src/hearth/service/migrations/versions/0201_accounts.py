"""Accounts, sessions, throttles, unit ownership; the setup-code hash on each unit.

Revision ID: 0201
Revises: 0101
Create Date: 2026-11-26

Frozen like every migration: plain SQLAlchemy types, not the application's models.
Nothing secret is stored in clear: ``units.setup_code_hash`` is the factory's argon2id
hash, ``accounts.password_hash`` argon2id, ``account_sessions.id_hash`` the SHA-256 of a
256-bit session id, ``accounts.totp_secret_enc`` AES-GCM under the service's key file,
``unit_owners.verifier`` a hash of the owner's local-access credential. ``unit_resets``
records erasures (factory reset, unbind) the unit has still to confirm.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0201"
down_revision: str | None = "0101"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ROLES = ("consumer", "operator", "security")
_SESSION_STATES = ("totp", "enrol", "active")
_SESSION_KINDS = ("cookie", "bearer")
_RESET_KINDS = ("reset", "unbind")
_RESET_STATES = ("pending", "done", "refused")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _big_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("units") as batch:
        batch.add_column(sa.Column("setup_code_hash", sa.String(256), nullable=True))

    roles = ", ".join(f"'{r}'" for r in _ROLES)
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("totp_secret_enc", sa.Text(), nullable=True),
        sa.Column("totp_enrolled_at", _ts(), nullable=True),
        sa.Column("totp_last_step", sa.BigInteger(), nullable=True),
        sa.Column("disabled_at", _ts(), nullable=True),
        sa.CheckConstraint(f"role IN ({roles})", name=op.f("ck_accounts_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("email", name=op.f("uq_accounts_email")),
    )

    states = ", ".join(f"'{s}'" for s in _SESSION_STATES)
    kinds = ", ".join(f"'{k}'" for k in _SESSION_KINDS)
    op.create_table(
        "account_sessions",
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("last_seen_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=False),
        sa.CheckConstraint(f"state IN ({states})", name=op.f("ck_account_sessions_state")),
        sa.CheckConstraint(f"kind IN ({kinds})", name=op.f("ck_account_sessions_kind")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"],
            name=op.f("fk_account_sessions_account_id_accounts"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_account_sessions")),
    )
    op.create_index(op.f("ix_account_sessions_account_id"), "account_sessions", ["account_id"])
    op.create_index(op.f("ix_account_sessions_expires_at"), "account_sessions", ["expires_at"])

    op.create_table(
        "throttles",
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("window_start", _ts(), nullable=False),
        sa.Column("blocked_until", _ts(), nullable=True),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_throttles")),
    )
    op.create_index(op.f("ix_throttles_updated_at"), "throttles", ["updated_at"])

    op.create_table(
        "unit_owners",
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("owner_ref", sa.String(32), nullable=False),
        sa.Column("verifier", sa.String(32), nullable=False),
        sa.Column("claimed_at", _ts(), nullable=False),
        sa.Column("bound_at", _ts(), nullable=True),
        sa.Column("command_id", sa.String(32), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["units.device_id"],
            name=op.f("fk_unit_owners_device_id_units"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"],
            name=op.f("fk_unit_owners_account_id_accounts"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_unit_owners")),
    )
    op.create_index(op.f("ix_unit_owners_account_id"), "unit_owners", ["account_id"])

    resets = ", ".join(f"'{k}'" for k in _RESET_KINDS)
    reset_states = ", ".join(f"'{k}'" for k in _RESET_STATES)
    op.create_table(
        "unit_resets",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(32), nullable=False),
        sa.Column("owner_ref", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("requested_at", _ts(), nullable=False),
        sa.Column("command_id", sa.String(32), nullable=True),
        sa.Column("done_at", _ts(), nullable=True),
        sa.CheckConstraint(f"kind IN ({resets})", name=op.f("ck_unit_resets_kind")),
        sa.CheckConstraint(f"state IN ({reset_states})", name=op.f("ck_unit_resets_state")),
        sa.ForeignKeyConstraint(
            ["device_id"], ["units.device_id"],
            name=op.f("fk_unit_resets_device_id_units"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_unit_resets")),
    )
    op.create_index(op.f("ix_unit_resets_device_id"), "unit_resets", ["device_id"])


def downgrade() -> None:
    for table in ("unit_resets", "unit_owners", "throttles", "account_sessions", "accounts"):
        op.drop_table(table)
    with op.batch_alter_table("units") as batch:
        batch.drop_column("setup_code_hash")
